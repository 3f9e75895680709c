package proxy_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/dupsnap/dupsnap/proxy"
	"github.com/dupsnap/dupsnap/proxy/proxytest"
	"github.com/dupsnap/dupsnap/proxy/s3store"
)

// GC runs on both replicas in a loop while both serve pulls: nothing a
// pull needs disappears, orphans do, and a cold third replica serves all.
func testS3GCWhileServing(t *testing.T, st proxy.StorageConfig) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	up := proxytest.StartUpstream(t)
	imgs := imageSet(t, up)
	grace := proxy.Duration(time.Second)
	a := proxytest.StartProxy(t, proxy.Config{Upstream: up.URL, Storage: st, GCGrace: grace})
	b := proxytest.StartProxy(t, proxy.Config{Upstream: up.URL, Storage: st, GCGrace: grace})
	// Orphans, as a crashed ingest leaves them: objects nothing references.
	bk, err := s3store.Open(st.S3)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 5; i++ {
		body := fmt.Sprintf("orphan %d", i)
		k := "objects/sha256/" + digest.FromString(body).Encoded()
		if err := bk.Put(ctx, k, strings.NewReader(body), int64(len(body)), map[string]string{"dupsnap-size": fmt.Sprint(len(body)), "dupsnap-enc": "raw"}, true); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(time.Duration(grace))

	stop := make(chan struct{})
	var gcWG sync.WaitGroup
	var mu sync.Mutex
	var runs, freed int
	for _, p := range []*proxytest.Proxy{a, b} {
		gcWG.Add(1)
		go func() {
			defer gcWG.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				rep, err := p.GC(ctx)
				if err != nil {
					t.Errorf("gc: %v", err)
					return
				}
				mu.Lock()
				runs++
				freed += rep.Objects
				mu.Unlock()
				time.Sleep(300 * time.Millisecond) // let ingests in (GC is writer-preferring)
			}
		}()
	}
	var wg sync.WaitGroup
	errs := make(chan string, 2*len(imgs))
	for _, img := range imgs {
		for _, p := range []*proxytest.Proxy{a, b} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := tryPull(p.Host, img); err != nil {
					errs <- err.Error()
				}
			}()
		}
	}
	wg.Wait()
	time.Sleep(200 * time.Millisecond) // at least one more GC round after the pulls
	close(stop)
	gcWG.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
	t.Logf("%d GC runs during the pulls freed %d objects", runs, freed)
	if freed < 5 {
		t.Errorf("GC freed %d objects, want at least the 5 orphans", freed)
	}
	_ = a.Flush(ctx)
	_ = b.Flush(ctx)
	checkStore(t, a.Server)
	c := proxytest.StartProxy(t, proxy.Config{Upstream: up.URL, Storage: st})
	up.SetDown(true) // the cold replica must serve from the bucket alone
	defer up.SetDown(false)
	for _, img := range imgs {
		if err := tryPull(c.Host, img); err != nil {
			t.Error(err)
		}
	}
}
