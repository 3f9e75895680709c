package proxy_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/dupsnap/dupsnap/proxy"
	"github.com/dupsnap/dupsnap/proxy/proxytest"
)

// benchS3 measures blob GET throughput of the local filesystem backend and
// of S3 with one and two replicas: cold (a tar layer rebuilt from file
// objects by a replica that never saw it) and retained (a compressed layer
// without recipe, streamed from the backend on every GET). Prints ratios.
func benchS3(t *testing.T, st proxy.StorageConfig) {
	up := proxytest.StartUpstream(t)
	img := up.PushImage(t, "bench/img", "v1", []proxytest.Layer{
		{Files: files("bench-tar", "data", 64, 128<<10), Format: proxytest.Uncompressed},
		{Files: files("bench-ret", "data", 64, 128<<10), Format: proxytest.GzipMultiMember},
		{Files: files("bench-small", "etc", 1000, 4<<10), Format: proxytest.Uncompressed},
	})
	tarL, retL, smallL := img.Layers[0], img.Layers[1], img.Layers[2]
	load := func(p *proxytest.Proxy) {
		for _, l := range img.Layers {
			getBlob(t, p.URL, l.Digest)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		_ = p.Flush(ctx)
	}
	type result struct{ cold, small, retained float64 }
	run := func(ps []*proxytest.Proxy) result {
		// Cold: every replica rebuilds the tar layer from the backend at once.
		start := time.Now()
		var wg sync.WaitGroup
		for _, p := range ps {
			wg.Add(1)
			go func() { defer wg.Done(); getBlob(t, p.URL, tarL.Digest) }()
		}
		wg.Wait()
		cold := float64(tarL.Size*int64(len(ps))) / time.Since(start).Seconds()
		// Cold, many small files: latency bound on a remote backend.
		start = time.Now()
		for _, p := range ps {
			wg.Add(1)
			go func() { defer wg.Done(); getBlob(t, p.URL, smallL.Digest) }()
		}
		wg.Wait()
		small := float64(smallL.Size*int64(len(ps))) / time.Since(start).Seconds()
		// Retained: 4 clients x 6 GETs, round-robin over the replicas.
		start = time.Now()
		for c := 0; c < 4; c++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; i < 6; i++ {
					getBlob(t, ps[(c+i)%len(ps)].URL, retL.Digest)
				}
			}()
		}
		wg.Wait()
		return result{cold, small, float64(retL.Size*24) / time.Since(start).Seconds()}
	}
	manifest := func(p *proxytest.Proxy) {
		if resp, _ := get(t, p.URL+"/v2/bench/img/manifests/v1", nil); resp.StatusCode != 200 {
			t.Fatal(resp.Status)
		}
	}

	// Local filesystem: load, then a fresh process (empty cache) on the root.
	root := t.TempDir()
	fsCfg := proxy.Config{Upstream: up.URL, Root: root, Predict: new(bool), Storage: proxy.StorageConfig{Type: "fs"}}
	loader := proxytest.StartProxy(t, fsCfg)
	manifest(loader)
	load(loader)
	loader.Stop()
	fsCfg.CacheDir = t.TempDir()
	fsP := proxytest.StartProxy(t, fsCfg)
	fsRes := run([]*proxytest.Proxy{fsP})
	fsP.Stop()

	s3Cfg := proxy.Config{Upstream: up.URL, Storage: st, Predict: new(bool)}
	loader = proxytest.StartProxy(t, s3Cfg)
	manifest(loader)
	load(loader)
	loader.Stop()
	one := run([]*proxytest.Proxy{proxytest.StartProxy(t, s3Cfg)})
	two := run([]*proxytest.Proxy{proxytest.StartProxy(t, s3Cfg), proxytest.StartProxy(t, s3Cfg)})

	mb := func(v float64) string { return fmt.Sprintf("%7.1f MB/s", v/1e6) }
	t.Logf("blob GET throughput: cold = tar layer rebuilt from objects by a replica that never served it (64 x 128 KiB, %d bytes; small: 1000 x 4 KiB, %d bytes); retained = %d-byte blob streamed from the backend x24, 4 clients", tarL.Size, smallL.Size, retL.Size)
	t.Logf("  %-16s cold %s   small %s   retained %s", "fs, 1 replica", mb(fsRes.cold), mb(fsRes.small), mb(fsRes.retained))
	for _, r := range []struct {
		name string
		r    result
	}{{"s3, 1 replica", one}, {"s3, 2 replicas", two}} {
		t.Logf("  %-16s cold %s   small %s   retained %s   (x%.2f, x%.2f, x%.2f of fs)", r.name, mb(r.r.cold), mb(r.r.small), mb(r.r.retained),
			r.r.cold/fsRes.cold, r.r.small/fsRes.small, r.r.retained/fsRes.retained)
	}
	t.Logf("  2 replicas vs 1 on s3: cold x%.2f, small x%.2f, retained x%.2f", two.cold/one.cold, two.small/one.small, two.retained/one.retained)
}

func getBlob(t *testing.T, base string, d digest.Digest) {
	t.Helper()
	resp, err := http.Get(base + "/v2/bench/img/blobs/" + d.String())
	if err != nil {
		t.Error(err)
		return
	}
	defer resp.Body.Close()
	v := d.Verifier()
	if _, err := io.Copy(v, resp.Body); err != nil || resp.StatusCode != 200 || !v.Verified() {
		t.Errorf("GET blob %s: %s %v", d, resp.Status, err)
	}
}
