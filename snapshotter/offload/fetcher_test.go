package offload

import (
	"bytes"
	"context"
	"fmt"
	"math/rand"
	"net/http"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/opencontainers/go-digest"
	dto "github.com/prometheus/client_model/go"

	"github.com/dupsnap/dupsnap/integration/harness"
	"github.com/dupsnap/dupsnap/pkg/cas"
	"github.com/dupsnap/dupsnap/pkg/layout"
	"github.com/dupsnap/dupsnap/proxy"
	"github.com/dupsnap/dupsnap/proxy/proxytest"
)

type world struct {
	up    *proxytest.Upstream
	px    *proxytest.Proxy
	mitm  *harness.MITM
	cas   *cas.Store
	store *layout.Store
	f     *Fetcher
	imgs  []*proxytest.Image
}

func randBytes(r *rand.Rand, n int) []byte {
	b := make([]byte, n)
	r.Read(b)
	return b
}

// newWorld: upstream with two images whose second layers share most files,
// dupproxy in front (manifests pulled through it, as a mirror would), a
// MITM between the node and dupproxy, and an empty node store.
func newWorld(t *testing.T) *world {
	r := rand.New(rand.NewSource(1))
	shared := make([]proxytest.File, 0, 40)
	for i := 0; i < 40; i++ {
		shared = append(shared, proxytest.File{Name: fmt.Sprintf("usr/lib/f%02d", i), Body: randBytes(r, 1000+i*3000), Mode: 0o644})
	}
	big := proxytest.File{Name: "usr/lib/big", Body: randBytes(r, 3<<20), Mode: 0o755}
	w := &world{up: proxytest.StartUpstream(t)}
	base := proxytest.Layer{Format: "gzip", Files: []proxytest.File{{Name: "etc/", Dir: true, Mode: 0o755}, {Name: "etc/os", Body: []byte("base\n"), Mode: 0o644}}}
	for i, name := range []string{"one", "two"} {
		files := append([]proxytest.File{{Name: "usr/", Dir: true, Mode: 0o755}, {Name: "usr/lib/", Dir: true, Mode: 0o755}}, shared...)
		files = append(files, big, proxytest.File{Name: "usr/own", Body: randBytes(r, 5000+i), Mode: 0o600},
			proxytest.File{Name: "usr/link", Link: "lib/f01"})
		w.imgs = append(w.imgs, w.up.PushImage(t, "app/"+name, "v1", []proxytest.Layer{base, {Format: "gzip", Files: files}}))
	}
	w.px = proxytest.StartProxy(t, proxy.Config{Upstream: w.up.URL})
	for _, img := range w.imgs {
		resp, err := http.Get(fmt.Sprintf("%s/v2/%s/manifests/%s?ns=%s", w.px.URL, img.Repo, img.Tag, w.up.Host))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("manifest through proxy: %s", resp.Status)
		}
	}
	w.mitm = harness.StartMITM(t, w.px.URL)
	dir := t.TempDir()
	var err error
	if w.cas, err = cas.Open(filepath.Join(dir, "cas"), cas.Options{NoSync: true}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.cas.Close() })
	if w.store, err = layout.OpenStore(filepath.Join(dir, "manifests"), w.cas); err != nil {
		t.Fatal(err)
	}
	if w.f, err = New(context.Background(), Config{Default: w.mitm.URL, Timeout: 30 * time.Second}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.f.Close() })
	return w
}

func (w *world) labels(img *proxytest.Image, i int) map[string]string {
	return map[string]string{
		snapshots.LabelSnapshotDiffID: img.DiffIDs[i].String(),
		LabelImageRef:                 w.up.Host + "/" + img.Repo + ":" + img.Tag,
		LabelLayerDigest:              img.Layers[i].Digest.String(),
	}
}

func (w *world) objects(t *testing.T) int {
	n := 0
	if err := w.cas.Walk(context.Background(), func(cas.Info) error { n++; return nil }); err != nil {
		t.Fatal(err)
	}
	return n
}

// exportEquals checks the stored layer rebuilds to the exact upstream tar.
func (w *world) exportEquals(t *testing.T, img *proxytest.Image, i int) {
	t.Helper()
	m, err := w.store.Get(context.Background(), img.DiffIDs[i])
	if err != nil {
		t.Fatalf("layer %d of %s not stored: %v", i, img.Repo, err)
	}
	var buf bytes.Buffer
	if err := layout.Export(context.Background(), w.cas, m, &buf); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf.Bytes(), img.Tars[img.Layers[i].Digest]) {
		t.Fatalf("layer %d of %s does not rebuild to its tar", i, img.Repo)
	}
}

func TestFetchSharedFilesOnlyMissing(t *testing.T) {
	w := newWorld(t)
	ctx := context.Background()
	one, two := w.imgs[0], w.imgs[1]
	for i := range one.Layers {
		if err := w.f.FetchLayer(ctx, w.labels(one, i), w.store); err != nil {
			t.Fatalf("layer %d: %v", i, err)
		}
		w.exportEquals(t, one, i)
	}
	// Image two: base layer is on the node already; its second layer
	// differs from one's only by usr/own, so one object travels.
	w.mitm.Reset()
	before := w.objects(t)
	for i := range two.Layers {
		if err := w.f.FetchLayer(ctx, w.labels(two, i), w.store); err != nil {
			t.Fatalf("layer %d: %v", i, err)
		}
		w.exportEquals(t, two, i)
	}
	if got := w.objects(t) - before; got != 1 {
		t.Errorf("second image added %d objects, want 1", got)
	}
	// Wire: one manifest + one object of ~5 KB (incompressible) + framing.
	ob, mb := w.mitm.Bytes("objects"), w.mitm.Bytes("manifest")
	t.Logf("second image: objects %d bytes, manifest %d bytes, blob %d bytes", ob, mb, two.Layers[1].Size)
	if ob < 5000 || ob > 5000+200 {
		t.Errorf("objects stream %d bytes for one 5001-byte object", ob)
	}
	if mb == 0 || ob+mb > two.Layers[1].Size/10 {
		t.Errorf("wire bytes %d+%d not well below the blob's %d", ob, mb, two.Layers[1].Size)
	}
}

func TestFetchTamperNothingKept(t *testing.T) {
	for _, tc := range []struct {
		name string
		mode int32
	}{{"object", harness.TamperObject}, {"manifest", harness.TamperManifest}, {"truncate", harness.TamperTruncate}} {
		t.Run(tc.name, func(t *testing.T) {
			w := newWorld(t)
			w.mitm.SetMode(tc.mode)
			img := w.imgs[0]
			err := w.f.FetchLayer(context.Background(), w.labels(img, 1), w.store)
			if err == nil {
				t.Fatal("tampered layer accepted")
			}
			t.Logf("refused: %v (%s)", err, result(err))
			if w.store.Has(img.DiffIDs[1]) {
				t.Fatal("tampered layer stored")
			}
			if n := w.objects(t); n != 0 {
				t.Fatalf("node CAS kept %d objects of a refused layer", n)
			}
			if n := stagedObjects(t, w.f); n != 0 {
				t.Fatalf("staging kept %d objects", n)
			}
			// The same fetcher succeeds once the channel is honest.
			w.mitm.SetMode(harness.TamperNone)
			if err := w.f.FetchLayer(context.Background(), w.labels(img, 1), w.store); err != nil {
				t.Fatal(err)
			}
			w.exportEquals(t, img, 1)
		})
	}
}

func stagedObjects(t *testing.T, f *Fetcher) int {
	if f.staging == nil {
		return 0
	}
	n := 0
	f.staging.Walk(context.Background(), func(cas.Info) error { n++; return nil })
	return n
}

func TestFetchUnreachableFailsFast(t *testing.T) {
	w := newWorld(t)
	f, err := New(context.Background(), Config{Default: "http://127.0.0.1:1", Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	start := time.Now()
	if err := f.FetchLayer(context.Background(), w.labels(w.imgs[0], 0), w.store); err == nil {
		t.Fatal("fetch from nowhere succeeded")
	}
	if d := time.Since(start); d > 4*time.Second {
		t.Fatalf("unreachable dupproxy took %v", d)
	}
	// A repository that does not reference the layer is refused.
	l := w.labels(w.imgs[0], 1)
	l[LabelImageRef] = w.up.Host + "/app/nothere:v1"
	if err := w.f.FetchLayer(context.Background(), l, w.store); err == nil || result(err) != "not_found" {
		t.Fatalf("unknown repository: %v", err)
	}
}

// Concurrent pulls of two images sharing files fetch each object once.
func TestFetchConcurrentSharedOnce(t *testing.T) {
	w := newWorld(t)
	before := counterValue(objectsFetched)
	var wg sync.WaitGroup
	errs := make([]error, 4)
	for k := 0; k < 4; k++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			img := w.imgs[k%2]
			errs[k] = w.f.FetchLayer(context.Background(), w.labels(img, 1), w.store)
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	for _, img := range w.imgs {
		w.exportEquals(t, img, 1)
	}
	// Distinct objects of both layers, each received once.
	distinct := map[digest.Digest]bool{}
	for _, img := range w.imgs {
		m, err := w.store.Get(context.Background(), img.DiffIDs[1])
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range m.Objects() {
			distinct[d] = true
		}
	}
	got := counterValue(objectsFetched) - before
	t.Logf("objects received %v, distinct %d, wire bytes %d", got, len(distinct), w.mitm.Bytes("objects"))
	if int(got) != len(distinct) {
		t.Fatalf("received %v objects for %d distinct: some fetched more than once", got, len(distinct))
	}
	if n := stagedObjects(t, w.f); n != 0 {
		t.Fatalf("staging kept %d objects", n)
	}
}

func counterValue(c interface{ Write(*dto.Metric) error }) float64 {
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		return -1
	}
	return m.GetCounter().GetValue()
}
