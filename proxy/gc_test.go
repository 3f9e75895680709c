package proxy_test

import (
	"context"
	"testing"
	"time"

	"github.com/dupsnap/dupsnap/proxy"
	"github.com/dupsnap/dupsnap/proxy/proxytest"
)

func TestGCEvictsOldestImage(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	up := proxytest.StartUpstream(t)
	old := up.PushImage(t, "gc/old", "v1", []proxytest.Layer{{Files: files("old", "o", 6, 32<<10), Format: proxytest.Gzip}})
	cur := up.PushImage(t, "gc/cur", "v1", []proxytest.Layer{{Files: files("cur", "c", 2, 16<<10), Format: proxytest.Uncompressed}})
	root := t.TempDir()
	p := proxytest.StartProxy(t, proxy.Config{Upstream: up.URL, Root: root})
	pullGGCR(t, p.Host, old)
	time.Sleep(10 * time.Millisecond)
	pullGGCR(t, p.Host, cur)
	full := storeStats(t, p)
	p.Stop()

	// Bound the store below both images: the least recently pulled goes.
	p = proxytest.StartProxy(t, proxy.Config{Upstream: up.URL, Root: root, GCGrace: proxy.Duration(time.Nanosecond),
		StoreSize: proxy.Size(full.PhysicalBytes - 1)})
	rep, err := p.GC(ctx)
	if err != nil {
		t.Fatal(err)
	}
	after := storeStats(t, p)
	t.Logf("gc: %+v\nbefore %+v\nafter  %+v", rep, full, after)
	if rep.ImagesEvicted != 1 || after.Images != 1 || after.Layers != 1 || after.PhysicalBytes >= full.PhysicalBytes || rep.Objects == 0 {
		t.Fatalf("gc did not evict exactly the old image")
	}
	up.SetDown(true)
	pullGGCR(t, p.Host, cur) // still complete without the upstream
}
