package rootfs

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// TestMeasureTreeLoad times what a server does before it can mount, for a
// chain shaped like an image with ~6000 files: loading and merging the
// manifests vs decoding the cached tree (medians of 15). Skipped unless
// DUPSNAP_ROOTFS_MEASURE=1.
func TestMeasureTreeLoad(t *testing.T) {
	if os.Getenv("DUPSNAP_ROOTFS_MEASURE") == "" {
		t.Skip("set DUPSNAP_ROOTFS_MEASURE=1")
	}
	e := newEnv(t)
	var layers []digest.Digest
	for l := 0; l < 3; l++ {
		var ents []tarEntry
		for d := 0; d < 100; d++ {
			dir := fmt.Sprintf("usr/share/layer%d/some-package-%d/", l, d)
			ents = append(ents, tarEntry{name: dir, typ: '5'})
			for f := 0; f < 20; f++ {
				ents = append(ents, tarEntry{name: fmt.Sprintf("%sfile-with-a-longer-name-%d.txt", dir, f), body: fmt.Sprintf("%d-%d-%d", l, d, f)})
			}
		}
		layers = append(layers, e.addLayer(t, makeTar(t, ents)))
	}
	cfg := Config{CASRoot: e.cas.Root(), ManifestRoot: filepath.Join(e.dir, "manifests"), Layers: layers}
	run := func() (time.Duration, bool) {
		t0 := time.Now()
		tree, store, cached, err := loadTree(context.Background(), cfg, newPhases())
		el := time.Since(t0)
		if err != nil {
			t.Fatal(err)
		}
		store.Close()
		if !cached {
			storeTreeCache(cfg.ManifestRoot, cfg.Layers, tree)
		}
		return el, cached
	}
	var merged, cached []time.Duration
	for i := 0; i < 15; i++ {
		os.RemoveAll(treeCacheDir(cfg.ManifestRoot))
		d, c := run()
		if c {
			t.Fatal("cached after removal")
		}
		merged = append(merged, d)
		d, c = run()
		if !c {
			t.Fatal("not cached after store")
		}
		cached = append(cached, d)
	}
	med := func(v []time.Duration) time.Duration {
		sort.Slice(v, func(i, j int) bool { return v[i] < v[j] })
		return v[len(v)/2]
	}
	fi, _ := os.Stat(treeCachePath(cfg.ManifestRoot, cfg.Layers))
	t.Logf("MEASURE tree load (6300 entries, 3 layers): manifests+merge %v, cached tree %v (%d KiB file)", med(merged), med(cached), fi.Size()>>10)
}
