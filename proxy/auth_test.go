package proxy_test

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dupsnap/dupsnap/proxy"
	"github.com/dupsnap/dupsnap/proxy/client"
	"github.com/dupsnap/dupsnap/proxy/proxytest"
)

// TestUpstreamTokenAuth: the upstream wants the anonymous bearer token flow
// (like Docker Hub); containerd's authorizer fetches and uses the token.
func TestUpstreamTokenAuth(t *testing.T) {
	up := proxytest.StartUpstream(t)
	img := up.PushImage(t, "tok/img", "v1", []proxytest.Layer{{Files: files("tok", "t", 2, 4<<10), Format: proxytest.Zstd}})
	var tokens atomic.Int32
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !strings.Contains(r.URL.Query().Get("scope"), "repository:tok/img:pull") {
			http.Error(w, "bad scope", http.StatusBadRequest)
			return
		}
		tokens.Add(1)
		fmt.Fprint(w, `{"token":"anon-token","expires_in":300}`)
	}))
	t.Cleanup(ts.Close)
	up.Wrap(func(w http.ResponseWriter, r *http.Request, next http.Handler) {
		if r.Header.Get("Authorization") != "Bearer anon-token" {
			w.Header().Set("WWW-Authenticate", fmt.Sprintf(`Bearer realm="%s/token",service="test",scope="repository:tok/img:pull"`, ts.URL))
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		next.ServeHTTP(w, r)
	})
	p := proxytest.StartProxy(t, proxy.Config{Upstream: up.URL})
	pullGGCR(t, p.Host, img)
	if tokens.Load() == 0 {
		t.Fatal("no token fetched")
	}
	resp, body := get(t, p.URL+"/v2/tok/img/tags/list", nil)
	if resp.StatusCode != 200 || !strings.Contains(string(body), `"v1"`) {
		t.Fatalf("tags through token auth: %s %s", resp.Status, body)
	}
}

func basic(user, pass string) string {
	return "Basic " + base64.StdEncoding.EncodeToString([]byte(user+":"+pass))
}

// TestAuthPassthrough: the upstream decides per client and repository; the
// proxy forwards the client's Basic credentials and never serves the shared
// store to a client the upstream refuses.
func TestAuthPassthrough(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	up := proxytest.StartUpstream(t)
	img := up.PushImage(t, "private/app", "v1", []proxytest.Layer{{Files: files("priv", "p", 3, 8<<10), Format: proxytest.Gzip}})
	allowed := map[string]string{"alice": "private/", "bob": "public/"}
	up.Wrap(func(w http.ResponseWriter, r *http.Request, next http.Handler) {
		user, pass, ok := r.BasicAuth()
		if r.URL.Path == "/v2/" {
			next.ServeHTTP(w, r)
			return
		}
		if !ok || pass != "pw-"+user {
			w.Header().Set("WWW-Authenticate", `Basic realm="upstream"`)
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		if !strings.HasPrefix(r.URL.Path, "/v2/"+allowed[user]) {
			w.WriteHeader(http.StatusForbidden)
			return
		}
		next.ServeHTTP(w, r)
	})
	p := proxytest.StartProxy(t, proxy.Config{Upstream: up.URL, AuthPassthrough: true})
	m := p.URL + "/v2/private/app/manifests/v1"
	if resp, _ := get(t, m, nil); resp.StatusCode != http.StatusUnauthorized || resp.Header.Get("WWW-Authenticate") == "" {
		t.Fatalf("no credentials: %s", resp.Status)
	}
	if resp, _ := get(t, m, map[string]string{"Authorization": basic("alice", "pw-alice")}); resp.StatusCode != 200 {
		t.Fatalf("alice: %s", resp.Status)
	}
	blob := p.URL + "/v2/private/app/blobs/" + img.Layers[0].Digest.String()
	if resp, _ := get(t, blob, map[string]string{"Authorization": basic("alice", "pw-alice")}); resp.StatusCode != 200 {
		t.Fatalf("alice blob: %s", resp.Status)
	}
	// bob: the content is in the store now, yet refused.
	for _, u := range []string{m, p.URL + "/v2/private/app/manifests/" + img.Digest.String(), blob} {
		if resp, _ := get(t, u, map[string]string{"Authorization": basic("bob", "pw-bob")}); resp.StatusCode != http.StatusForbidden {
			t.Fatalf("bob %s: %s", u, resp.Status)
		}
		if resp, _ := get(t, u, map[string]string{"Authorization": basic("alice", "wrong")}); resp.StatusCode != http.StatusUnauthorized {
			t.Fatalf("bad password %s: %s", u, resp.Status)
		}
	}
	c := client.New(p.URL, nil)
	c.Authorization = basic("bob", "pw-bob")
	if _, err := c.LayerManifest(ctx, "private/app", img.Layers[0].Digest); !errors.Is(err, client.ErrDenied) {
		t.Fatalf("bob dedup manifest: %v", err)
	}
	c.Authorization = basic("alice", "pw-alice")
	if _, err := c.LayerManifest(ctx, "private/app", img.Layers[0].Digest); err != nil {
		t.Fatalf("alice dedup manifest: %v", err)
	}
}
