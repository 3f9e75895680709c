package proxy_test

import (
	"bytes"
	"context"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/opencontainers/go-digest"

	"github.com/dupsnap/dupsnap/proxy"
	"github.com/dupsnap/dupsnap/proxy/proxytest"
)

// imageSet pushes images that share a base layer's files (in differently
// compressed layers) plus unique files: gzip, zstd, uncompressed, and a
// multi-member gzip layer that no recipe reproduces.
func imageSet(t *testing.T, up *proxytest.Upstream) []*proxytest.Image {
	base := files("base", "usr/lib", 12, 48<<10)
	var imgs []*proxytest.Image
	for _, spec := range []struct{ repo, format string }{
		{"apps/gzip", proxytest.Gzip}, {"apps/zstd", proxytest.Zstd}, {"apps/plain", proxytest.Uncompressed}, {"apps/multi", proxytest.GzipMultiMember},
	} {
		app := files(spec.repo, "app", 3, 20<<10)
		// The app layer repeats some base files at other paths (duplicates inside images too).
		dup := []proxytest.File{{Name: "opt", Dir: true}, {Name: "opt/copy", Body: base[1].Body}, {Name: "opt/link", Link: "../usr/lib/f000"}}
		imgs = append(imgs, up.PushImage(t, spec.repo, "v1", []proxytest.Layer{
			{Files: base, Format: spec.format},
			{Files: append(app, dup...), Format: spec.format},
		}))
	}
	return imgs
}

func pullGGCR(t *testing.T, host string, img *proxytest.Image) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	ref, err := name.ParseReference(host+"/"+img.Repo+":"+img.Tag, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	ri, err := remote.Image(ref, remote.WithContext(ctx))
	if err != nil {
		t.Fatalf("pull %s: %v", ref, err)
	}
	verifyImage(t, ri, img)
	d, _ := ri.Digest()
	if d.String() != img.Digest.String() {
		t.Fatalf("manifest digest %s, want %s", d, img.Digest)
	}
}

func TestPullThroughRestoreAndStale(t *testing.T) {
	up := proxytest.StartUpstream(t)
	imgs := imageSet(t, up)
	root, cache := t.TempDir(), t.TempDir()
	p := proxytest.StartProxy(t, proxy.Config{Upstream: up.URL, Root: root, CacheDir: cache})
	for _, img := range imgs {
		pullGGCR(t, p.Host, img) // cold
		pullGGCR(t, p.Host, img) // warm
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	if err := p.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	st, err := p.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("stats: %+v", st)
	// gzip (Go encoder) and zstd (klauspost, small one-block frames with a
	// content size included) layers must get recipes; multi-member gzip ones
	// must be retained.
	if st.Layers != 8 || st.TarLayers != 2 || st.RecipeLayers != 4 || st.RetainedLayers != 2 {
		t.Fatalf("want 8 layers: 2 tar, 4 recipe, 2 retained; got %+v", st)
	}
	var upstreamBytes int64
	for _, img := range imgs {
		for _, b := range img.Blobs {
			upstreamBytes += int64(len(b))
		}
		upstreamBytes += int64(len(img.Manifest))
	}
	t.Logf("store physical %d bytes vs upstream blobs %d bytes (%.2fx); logical %d", st.PhysicalBytes, upstreamBytes,
		float64(st.PhysicalBytes)/float64(upstreamBytes), st.LogicalBytes)
	if st.PhysicalBytes >= upstreamBytes {
		t.Fatalf("store (%d) not smaller than upstream blobs (%d)", st.PhysicalBytes, upstreamBytes)
	}

	// Range requests on a restored layer.
	l := imgs[0].Layers[0]
	want := imgs[0].Blobs[l.Digest]
	resp, body := get(t, p.URL+"/v2/apps/gzip/blobs/"+l.Digest.String(), map[string]string{"Range": "bytes=10-19"})
	if resp.StatusCode != http.StatusPartialContent || !bytes.Equal(body, want[10:20]) {
		t.Fatalf("range: %s %q", resp.Status, body)
	}
	resp, _ = get(t, p.URL+"/v2/apps/gzip/blobs/"+l.Digest.String(), map[string]string{"Range": "bytes=99999999-"})
	if resp.StatusCode != http.StatusRequestedRangeNotSatisfiable {
		t.Fatalf("unsatisfiable range: %s", resp.Status)
	}
	// Push and delete are refused with the spec's error.
	resp, body = do(t, http.MethodPost, p.URL+"/v2/apps/gzip/blobs/uploads/", nil)
	if resp.StatusCode != http.StatusMethodNotAllowed || !strings.Contains(string(body), `"UNSUPPORTED"`) {
		t.Fatalf("push: %s %s", resp.Status, body)
	}
	resp, body = do(t, http.MethodDelete, p.URL+"/v2/apps/gzip/manifests/"+imgs[0].Digest.String(), nil)
	if resp.StatusCode != http.StatusMethodNotAllowed || !strings.Contains(string(body), `"UNSUPPORTED"`) {
		t.Fatalf("delete: %s %s", resp.Status, body)
	}

	// Restart over the same store with the cache deleted and the upstream
	// gone: every blob must come back byte-identical from the store, and
	// tags are served stale with a header.
	p.Stop()
	if err := os.RemoveAll(cache); err != nil {
		t.Fatal(err)
	}
	up.SetDown(true)
	p2 := proxytest.StartProxy(t, proxy.Config{Upstream: up.URL, Root: root, CacheDir: cache, Predict: new(bool)})
	for _, img := range imgs {
		pullGGCR(t, p2.Host, img)
	}
	resp, _ = get(t, p2.URL+"/v2/apps/zstd/manifests/v1", nil)
	if resp.StatusCode != 200 || resp.Header.Get("X-Dupproxy-Stale") != "true" || resp.Header.Get("Warning") == "" {
		t.Fatalf("stale manifest: %s %v", resp.Status, resp.Header)
	}
	resp, body = get(t, p2.URL+"/v2/apps/zstd/manifests/nosuchtag", nil)
	if resp.StatusCode != http.StatusNotFound || !strings.Contains(string(body), "MANIFEST_UNKNOWN") {
		t.Fatalf("unknown tag with upstream down: %s %s", resp.Status, body)
	}
}

func TestConcurrentMissesFetchOnce(t *testing.T) {
	up := proxytest.StartUpstream(t)
	img := up.PushImage(t, "conc/img", "v1", []proxytest.Layer{{Files: files("c", "data", 8, 64<<10), Format: proxytest.Gzip}})
	var blobGets atomic.Int32
	layer := img.Layers[0].Digest
	up.Wrap(func(w http.ResponseWriter, r *http.Request, next http.Handler) {
		if r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/blobs/"+layer.String()) {
			blobGets.Add(1)
			time.Sleep(100 * time.Millisecond) // let the misses pile up
		}
		next.ServeHTTP(w, r)
	})
	p := proxytest.StartProxy(t, proxy.Config{Upstream: up.URL})
	resp, _ := get(t, p.URL+"/v2/conc/img/manifests/v1", nil)
	if resp.StatusCode != 200 {
		t.Fatal(resp.Status)
	}
	var wg sync.WaitGroup
	errs := make(chan string, 8)
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, b := get(t, p.URL+"/v2/conc/img/blobs/"+layer.String(), nil)
			if resp.StatusCode != 200 || digest.FromBytes(b) != layer {
				errs <- resp.Status
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Fatalf("concurrent GET: %s", e)
	}
	if n := blobGets.Load(); n != 1 {
		t.Fatalf("upstream saw %d blob GETs, want 1", n)
	}
}
