package proxy_test

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/dupsnap/dupsnap/proxy"
	"github.com/dupsnap/dupsnap/proxy/proxytest"
)

func storeStats(t *testing.T, p *proxytest.Proxy) proxy.Stats {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := p.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	st, err := p.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	st.CacheBlobs, st.CacheBytes = 0, 0
	return st
}

func TestHostileUpstream(t *testing.T) {
	up := proxytest.StartUpstream(t)
	good := up.PushImage(t, "h/good", "v1", []proxytest.Layer{{Files: files("good", "g", 4, 16<<10), Format: proxytest.Gzip}})
	evil := up.PushImage(t, "h/evil", "v1", []proxytest.Layer{{Files: []proxytest.File{
		{Name: "etc", Dir: true}, {Name: "../../escape", Body: []byte("owned")},
	}, Format: proxytest.Gzip}})
	up.PushManifest(t, "h/good", "v2", "application/vnd.oci.image.manifest.v1+json", append(append([]byte(nil), good.Manifest...), '\n'))
	p := proxytest.StartProxy(t, proxy.Config{Upstream: up.URL})
	layer := good.Layers[0]
	blobURL := p.URL + "/v2/h/good/blobs/" + layer.Digest.String()
	if resp, _ := get(t, p.URL+"/v2/h/good/manifests/v1", nil); resp.StatusCode != 200 {
		t.Fatal(resp.Status)
	}
	before := storeStats(t, p)

	tamper := func(name string, f func(w http.ResponseWriter, r *http.Request, next http.Handler), url, wantInBody string) {
		t.Helper()
		up.Wrap(f)
		defer up.Wrap(nil)
		resp, body := get(t, url, nil)
		if resp.StatusCode < 400 || !strings.Contains(string(body), wantInBody) {
			t.Fatalf("%s: %s %s", name, resp.Status, body)
		}
		if after := storeStats(t, p); after != before {
			t.Fatalf("%s: store changed:\n%+v\n%+v", name, before, after)
		}
		t.Logf("%s: %s %s", name, resp.Status, strings.TrimSpace(string(body)))
	}
	isLayerGet := func(r *http.Request) bool {
		return r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/blobs/"+layer.Digest.String())
	}
	// Same size, one byte flipped.
	tamper("wrong digest", func(w http.ResponseWriter, r *http.Request, next http.Handler) {
		if !isLayerGet(r) {
			next.ServeHTTP(w, r)
			return
		}
		b := append([]byte(nil), good.Blobs[layer.Digest]...)
		b[len(b)/2] ^= 0xff
		w.Header().Set("Content-Length", strconv.Itoa(len(b)))
		w.Write(b)
	}, blobURL, "do not hash")
	// Body cut in the middle: Content-Length promises more.
	tamper("truncated body", func(w http.ResponseWriter, r *http.Request, next http.Handler) {
		if !isLayerGet(r) {
			next.ServeHTTP(w, r)
			return
		}
		b := good.Blobs[layer.Digest]
		conn, rw, err := w.(http.Hijacker).Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		fmt.Fprintf(rw, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Type: application/octet-stream\r\n\r\n", len(b))
		rw.Write(b[:len(b)/2])
		rw.Flush()
	}, blobURL, "broke off")
	// A manifest that is not JSON but carries its own correct digest.
	junk := []byte("this is not a manifest")
	jd := digest.FromBytes(junk)
	tamper("malformed manifest", func(w http.ResponseWriter, r *http.Request, next http.Handler) {
		if !strings.Contains(r.URL.Path, "/manifests/") {
			next.ServeHTTP(w, r)
			return
		}
		w.Header().Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
		w.Header().Set("Docker-Content-Digest", jd.String())
		w.Header().Set("Content-Length", strconv.Itoa(len(junk)))
		if r.Method == http.MethodGet {
			w.Write(junk)
		}
	}, p.URL+"/v2/h/good/manifests/junk", "MANIFEST_INVALID")
	// A manifest whose bytes do not match the digest the upstream announced.
	tamper("manifest digest mismatch", func(w http.ResponseWriter, r *http.Request, next http.Handler) {
		if r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/manifests/") {
			b := append([]byte(nil), good.Manifest...)
			b = append(b, ' ')
			w.Header().Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
			w.Header().Set("Content-Length", strconv.Itoa(len(b)))
			w.Write(b)
			return
		}
		next.ServeHTTP(w, r)
	}, p.URL+"/v2/h/good/manifests/v2", "does not match")
	// Path traversal inside the layer tar: refused, nothing kept.
	if resp, _ := get(t, p.URL+"/v2/h/evil/manifests/v1", nil); resp.StatusCode != 200 {
		t.Fatal(resp.Status)
	}
	before = storeStats(t, p)
	resp, body := get(t, p.URL+"/v2/h/evil/blobs/"+evil.Layers[0].Digest.String(), nil)
	if resp.StatusCode != http.StatusBadGateway || !strings.Contains(string(body), "rejected") {
		t.Fatalf("path traversal layer: %s %s", resp.Status, body)
	}
	t.Logf("path traversal: %s %s", resp.Status, strings.TrimSpace(string(body)))
	if after := storeStats(t, p); after != before {
		t.Fatalf("path traversal: store changed:\n%+v\n%+v", before, after)
	}
	// And the good layer still comes through intact afterwards.
	resp, b := get(t, blobURL, nil)
	if resp.StatusCode != 200 || digest.FromBytes(b) != layer.Digest {
		t.Fatalf("good layer after tampering: %s", resp.Status)
	}
}

func TestHostileClients(t *testing.T) {
	up := proxytest.StartUpstream(t)
	up.PushImage(t, "c/img", "v1", []proxytest.Layer{{Files: files("cl", "x", 2, 4<<10), Format: proxytest.Gzip}})
	p := proxytest.StartProxy(t, proxy.Config{Upstream: up.URL})
	for _, c := range []struct{ path, code string }{
		{"/v2/c/img/blobs/sha256:zzz", "DIGEST_INVALID"},
		{"/v2/c/img/blobs/md5:abcd", "DIGEST_INVALID"},
		{"/v2/../../etc/passwd/manifests/v1", "NAME_INVALID"},
		{"/v2/C/IMG/manifests/v1", "NAME_INVALID"},
		{"/v2/c/_tags/manifests/v1", "NAME_INVALID"},
		{"/dedup/v1/c/img/layers/sha256:" + strings.Repeat("0", 64) + "/manifest", "BLOB_UNKNOWN"},
		{"/v2/c/img/manifests/" + strings.Repeat("a", 200), "MANIFEST_UNKNOWN"},
	} {
		// Raw request line so that the client does not clean the path.
		resp := rawGet(t, p.Host, c.path)
		if resp.StatusCode < 400 || !strings.Contains(resp.body, c.code) {
			t.Fatalf("%s: %d %s", c.path, resp.StatusCode, resp.body)
		}
	}
}

type rawResp struct {
	StatusCode int
	body       string
}

func rawGet(t *testing.T, host, path string) rawResp {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, "http://"+host+path, nil)
	req.URL.Opaque = path
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	resp, err := http.DefaultClient.Do(req.WithContext(ctx))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var sb strings.Builder
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		sb.WriteString(sc.Text())
	}
	return rawResp{resp.StatusCode, sb.String()}
}
