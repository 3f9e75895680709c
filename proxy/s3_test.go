package proxy_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
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
	"github.com/dupsnap/dupsnap/proxy/s3store"
	"github.com/dupsnap/dupsnap/proxy/s3store/s3test"
)

// TestS3Backend runs dupproxy replicas over one bucket of a real SeaweedFS
// S3 server (started once for all subtests; skipped without _tools/bin/weed).
func TestS3Backend(t *testing.T) {
	weed := s3test.Start(t)
	var nb atomic.Int64
	newBucket := func(t testing.TB) s3store.Config {
		return weed.Bucket(t, fmt.Sprintf("dupproxy-%d", nb.Add(1)))
	}
	storage := func(c s3store.Config) proxy.StorageConfig {
		return proxy.StorageConfig{Type: "s3", S3: c, LeaseTTL: proxy.Duration(3 * time.Second)}
	}
	t.Run("Replicas", func(t *testing.T) { testS3Replicas(t, storage(newBucket(t))) })
	t.Run("GCWhileServing", func(t *testing.T) { testS3GCWhileServing(t, storage(newBucket(t))) })
	t.Run("KillMidIngest", func(t *testing.T) { testS3KillMidIngest(t, storage(newBucket(t))) })
	t.Run("BlobVanishesMidRead", func(t *testing.T) { testS3BlobVanishesMidRead(t, storage(newBucket(t))) })
	// The local-store tests, over S3: a fresh bucket per proxy.
	t.Run("Suites", func(t *testing.T) {
		// One bucket per test: a test that reopens its store gets it back.
		var mu sync.Mutex
		byTest := map[string]proxy.StorageConfig{}
		proxytest.Storage = func(t testing.TB) proxy.StorageConfig {
			mu.Lock()
			defer mu.Unlock()
			if st, ok := byTest[t.Name()]; ok {
				return st
			}
			st := storage(newBucket(t))
			byTest[t.Name()] = st
			return st
		}
		t.Cleanup(func() { proxytest.Storage = nil })
		t.Run("OCIConformancePull", TestOCIConformancePull)
		t.Run("DedupAPI", TestDedupAPI)
		t.Run("DedupResume", TestDedupResume)
		t.Run("PullThroughRestoreAndStale", TestPullThroughRestoreAndStale)
		t.Run("GCEvictsOldestImage", TestGCEvictsOldestImage)
	})
	t.Run("Bench", func(t *testing.T) { benchS3(t, storage(newBucket(t))) })
}

func checkStore(t *testing.T, s *proxy.Server) proxy.CheckReport {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	rep, err := s.Check(ctx)
	if err != nil {
		t.Fatalf("check: %v", err)
	}
	if len(rep.Problems) > 0 {
		t.Fatalf("store inconsistent: %s", strings.Join(rep.Problems, "\n"))
	}
	return rep
}

// Pull through replica A, then through B with a cold cache; then every
// image through both at once.
func testS3Replicas(t *testing.T, st proxy.StorageConfig) {
	up := proxytest.StartUpstream(t)
	imgs := imageSet(t, up)
	a := proxytest.StartProxy(t, proxy.Config{Upstream: up.URL, Storage: st})
	b := proxytest.StartProxy(t, proxy.Config{Upstream: up.URL, Storage: st, Predict: new(bool)})
	var blobGets atomic.Int32
	up.Wrap(func(w http.ResponseWriter, r *http.Request, next http.Handler) {
		if r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/") {
			blobGets.Add(1)
		}
		next.ServeHTTP(w, r)
	})
	pullGGCR(t, a.Host, imgs[0])
	before := blobGets.Load()
	pullGGCR(t, b.Host, imgs[0]) // B's cache is empty: everything comes from the bucket
	if n := blobGets.Load() - before; n != 0 {
		t.Fatalf("replica B fetched %d blobs upstream, want none", n)
	}
	var wg sync.WaitGroup
	errs := make(chan string, 16)
	for _, img := range imgs[1:] {
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
	close(errs)
	for e := range errs {
		t.Error(e)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	_ = a.Flush(ctx)
	_ = b.Flush(ctx)
	rep := checkStore(t, a.Server)
	stA, err := a.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("check: %+v; stats: %+v", rep, stA)
	// Each layer was decomposed once however many replicas pulled it.
	if stA.Layers != 2*len(imgs) {
		t.Fatalf("%d layer records, want %d", stA.Layers, 2*len(imgs))
	}
}

// tryPull is pullGGCR for goroutines: it pulls img through host with
// go-containerregistry and checks every blob against its digest.
func tryPull(host string, img *proxytest.Image) error {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	ref, err := name.ParseReference(host+"/"+img.Repo+":"+img.Tag, name.Insecure)
	if err != nil {
		return err
	}
	ri, err := remote.Image(ref, remote.WithContext(ctx))
	if err != nil {
		return fmt.Errorf("pull %s: %w", ref, err)
	}
	if d, err := ri.Digest(); err != nil || d.String() != img.Digest.String() {
		return fmt.Errorf("pull %s: manifest digest %s: %v", ref, d, err)
	}
	raw, err := ri.RawConfigFile()
	if err != nil || digest.FromBytes(raw) != img.Config.Digest {
		return fmt.Errorf("pull %s: config: %v", ref, err)
	}
	layers, err := ri.Layers()
	if err != nil {
		return err
	}
	for i, l := range layers {
		rc, err := l.Compressed()
		if err != nil {
			return err
		}
		b, err := io.ReadAll(rc)
		rc.Close()
		if err != nil {
			return fmt.Errorf("pull %s: layer %d: %w", ref, i, err)
		}
		if digest.FromBytes(b) != img.Layers[i].Digest {
			return fmt.Errorf("pull %s: layer %d does not hash to %s", ref, i, img.Layers[i].Digest)
		}
	}
	return nil
}
