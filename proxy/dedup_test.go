package proxy_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/dupsnap/dupsnap/pkg/cas"
	"github.com/dupsnap/dupsnap/pkg/layout"
	"github.com/dupsnap/dupsnap/proxy"
	"github.com/dupsnap/dupsnap/proxy/client"
	"github.com/dupsnap/dupsnap/proxy/proxytest"
)

func TestDedupAPI(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	up := proxytest.StartUpstream(t)
	shared := files("shared", "lib", 6, 16<<10)
	a := up.PushImage(t, "team/a", "v1", []proxytest.Layer{{Files: shared, Format: proxytest.Gzip}, {Files: files("a", "a", 3, 8<<10), Format: proxytest.Zstd}})
	secret := up.PushImage(t, "team/secret", "v1", []proxytest.Layer{{Files: files("secret", "s", 2, 8<<10), Format: proxytest.Gzip}})
	p := proxytest.StartProxy(t, proxy.Config{Upstream: up.URL, MaxObjectsPerRequest: 50})
	c := client.New(p.URL, nil)

	// Nothing is served for a repository before its manifests were pulled.
	if _, err := c.LayerManifest(ctx, "team/a", a.Layers[0].Digest); !errors.Is(err, client.ErrNotFound) {
		t.Fatalf("layer before manifest pull: %v", err)
	}
	for _, img := range []*proxytest.Image{a, secret} {
		if resp, _ := get(t, p.URL+"/v2/"+img.Repo+"/manifests/v1", nil); resp.StatusCode != 200 {
			t.Fatal(resp.Status)
		}
	}
	// Layer manifests by digest (ingested on demand) and by diffID.
	node, err := cas.Open(t.TempDir(), cas.Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	defer node.Close()
	for i, ld := range a.Layers {
		l, err := c.LayerManifest(ctx, "team/a", ld.Digest)
		if err != nil {
			t.Fatalf("layer %d: %v", i, err)
		}
		if l.DiffID != a.DiffIDs[i] || l.MediaType != ld.MediaType {
			t.Fatalf("layer %d: diffID %s mediaType %s", i, l.DiffID, l.MediaType)
		}
		byID, err := c.LayerManifestByDiffID(ctx, "team/a", a.DiffIDs[i])
		if err != nil || byID.Digest != ld.Digest {
			t.Fatalf("by diffID: %v %+v", err, byID)
		}
		// The node has some objects already: fetch only the rest.
		objs := l.Manifest.Objects()
		b := node.NewBatch()
		if i == 0 {
			pre := node.NewBatch()
			if _, _, err := pre.Put(ctx, bytes.NewReader(shared[1].Body)); err != nil {
				t.Fatal(err)
			}
			if err := pre.Commit(ctx); err != nil {
				t.Fatal(err)
			}
		}
		var want []digest.Digest
		for _, o := range objs {
			if !node.Has(o) {
				want = append(want, o)
			}
		}
		c.BatchSize = 2 // several parallel requests
		st, err := c.FetchObjects(ctx, "team/a", []digest.Digest{ld.Digest}, want, b)
		if err != nil {
			t.Fatalf("fetch objects: %v", err)
		}
		if err := b.Commit(ctx); err != nil {
			t.Fatal(err)
		}
		if st.Objects != len(want) || (i == 0 && len(want) != len(objs)-1) {
			t.Fatalf("fetched %d of %d wanted (%d objects)", st.Objects, len(want), len(objs))
		}
		t.Logf("layer %d: %d objects, %d bytes, %d on the wire, %d requests", i, st.Objects, st.Bytes, st.WireBytes, st.Requests)
		// The node rebuilds the exact tar.
		h := digest.SHA256.Digester()
		if err := layout.Export(ctx, node, l.Manifest, h.Hash()); err != nil {
			t.Fatal(err)
		}
		if h.Digest() != a.DiffIDs[i] {
			t.Fatalf("rebuilt tar %s, want %s", h.Digest(), a.DiffIDs[i])
		}
	}

	// Cross-repository: a.Layers[0] through team/secret, and secret's layer
	// through team/a, are refused the same way whether or not stored.
	if _, err := c.LayerManifest(ctx, "team/secret", a.Layers[0].Digest); !errors.Is(err, client.ErrNotFound) {
		t.Fatalf("cross-repo layer: %v", err)
	}
	if _, err := c.LayerManifest(ctx, "team/a", secret.Layers[0].Digest); !errors.Is(err, client.ErrNotFound) {
		t.Fatalf("cross-repo layer: %v", err)
	}
	if _, err := c.LayerManifestByDiffID(ctx, "team/secret", a.DiffIDs[0]); !errors.Is(err, client.ErrNotFound) {
		t.Fatalf("cross-repo diffID: %v", err)
	}
	sl, err := c.LayerManifest(ctx, "team/secret", secret.Layers[0].Digest)
	if err != nil {
		t.Fatal(err)
	}
	secretObj := sl.Manifest.Objects()[0]
	post := func(repo string, req proxy.ObjectsRequest) (*http.Response, []byte) {
		b, _ := json.Marshal(req)
		return do(t, http.MethodPost, p.URL+"/dedup/v1/"+repo+"/objects", b)
	}
	// An object of another repository's layer, named with an own layer.
	resp, body := post("team/a", proxy.ObjectsRequest{Layers: []digest.Digest{a.Layers[0].Digest}, Objects: []digest.Digest{secretObj}})
	if resp.StatusCode != http.StatusNotFound || bytes.Contains(body, []byte("DUPOBJ")) {
		t.Fatalf("cross-repo object: %s %s", resp.Status, body)
	}
	// ...or naming the other repository's layer.
	resp, body = post("team/a", proxy.ObjectsRequest{Layers: []digest.Digest{secret.Layers[0].Digest}, Objects: []digest.Digest{secretObj}})
	if resp.StatusCode != http.StatusNotFound {
		t.Fatalf("cross-repo layer in objects request: %s %s", resp.Status, body)
	}
	// The /v2 blob API does not leak either: the upstream has no such blob in team/a.
	resp, _ = get(t, p.URL+"/v2/team/a/blobs/"+secret.Layers[0].Digest.String(), nil)
	if resp.StatusCode != http.StatusNotFound {
		t.Fatalf("cross-repo blob GET: %s", resp.Status)
	}
	// Oversized requests.
	many := make([]digest.Digest, 51)
	for i := range many {
		many[i] = secretObj
	}
	resp, body = post("team/secret", proxy.ObjectsRequest{Layers: []digest.Digest{secret.Layers[0].Digest}, Objects: many})
	if resp.StatusCode != http.StatusRequestEntityTooLarge || !strings.Contains(string(body), "SIZE_INVALID") {
		t.Fatalf("too many objects: %s %s", resp.Status, body)
	}
	resp, body = do(t, http.MethodPost, p.URL+"/dedup/v1/team/secret/objects", bytes.Repeat([]byte("x"), 8<<20))
	if resp.StatusCode != http.StatusRequestEntityTooLarge && resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("huge body: %s %s", resp.Status, body)
	}
}

// TestDedupResume: a response bounded by MaxResponseBytes is completed by
// re-posting what is missing.
func TestDedupResume(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	up := proxytest.StartUpstream(t)
	img := up.PushImage(t, "r/img", "v1", []proxytest.Layer{{Files: files("resume", "d", 10, 32<<10), Format: proxytest.Gzip}})
	p := proxytest.StartProxy(t, proxy.Config{Upstream: up.URL, MaxResponseBytes: 40 << 10})
	get(t, p.URL+"/v2/r/img/manifests/v1", nil)
	c := client.New(p.URL, nil)
	c.BatchSize, c.MaxRetries = 100, 20
	l, err := c.LayerManifest(ctx, "r/img", img.Layers[0].Digest)
	if err != nil {
		t.Fatal(err)
	}
	node, err := cas.Open(t.TempDir(), cas.Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	defer node.Close()
	b := node.NewBatch()
	st, err := c.FetchObjects(ctx, "r/img", []digest.Digest{img.Layers[0].Digest}, l.Manifest.Objects(), b)
	if err != nil {
		t.Fatal(err)
	}
	if st.Requests < 3 || st.Objects != len(l.Manifest.Objects()) {
		t.Fatalf("want several requests for all %d objects: %+v", len(l.Manifest.Objects()), st)
	}
	if err := b.Commit(ctx); err != nil {
		t.Fatal(err)
	}
}
