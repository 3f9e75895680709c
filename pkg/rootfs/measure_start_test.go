package rootfs

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
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

// TestMeasureStartStop times Start and Stop of a real server process for
// an active snapshot of a ~6300-entry chain whose tree is cached (medians
// of 12). Skipped unless DUPSNAP_ROOTFS_MEASURE=1.
func TestMeasureStartStop(t *testing.T) {
	needRoot(t)
	if os.Getenv("DUPSNAP_ROOTFS_MEASURE") == "" {
		t.Skip("set DUPSNAP_ROOTFS_MEASURE=1")
	}
	bin := dupsnapBin(t)
	e := newEnv(t)
	var ents []tarEntry
	for d := 0; d < 300; d++ {
		dir := fmt.Sprintf("usr/share/some-package-%d/", d)
		ents = append(ents, tarEntry{name: dir, typ: '5'})
		for f := 0; f < 20; f++ {
			ents = append(ents, tarEntry{name: fmt.Sprintf("%sfile-with-a-longer-name-%d.txt", dir, f), body: fmt.Sprintf("%d-%d", d, f)})
		}
	}
	layers := []digest.Digest{e.addLayer(t, makeTar(t, ents))}
	var starts, stops, discards []time.Duration
	for i := 0; i < 13; i++ {
		dir := filepath.Join(e.dir, fmt.Sprint("snap", i))
		mp := filepath.Join(dir, "rootfs")
		os.MkdirAll(mp, 0o755)
		cfg := Config{Mountpoint: mp, CASRoot: e.cas.Root(), ManifestRoot: filepath.Join(e.dir, "manifests"),
			Layers: layers, StateDir: filepath.Join(dir, "state")}
		t0 := time.Now()
		pid := startServer(t, bin, cfg, filepath.Join(dir, "rootfs.log"))
		st := time.Since(t0)
		if i <= 1 {
			// Idle RSS after the delayed FreeOSMemory (i == 1: tree from
			// the cache; i == 0 merged it).
			time.Sleep(freeOSMemoryDelay + 500*time.Millisecond)
			t.Logf("idle server RSS: %.1f MiB (anon %.1f MiB)", rssKiB(pid)/1024, rssAnonKiB(pid)/1024)
		}
		if err := os.WriteFile(filepath.Join(mp, "new"), []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		t0 = time.Now()
		stopf := Stop
		if i%2 == 1 {
			stopf = Discard
		}
		if err := stopf(ctx, mp); err != nil {
			t.Fatal(err)
		}
		sp := time.Since(t0)
		cancel()
		if i == 0 {
			continue // the first start merges and writes the cache
		}
		starts = append(starts, st)
		if i%2 == 1 {
			discards = append(discards, sp)
		} else {
			stops = append(stops, sp)
		}
		if i == 5 {
			b, _ := os.ReadFile(filepath.Join(dir, "rootfs.log"))
			t.Logf("server log: %s", b)
		}
	}
	med := func(v []time.Duration) time.Duration {
		sort.Slice(v, func(i, j int) bool { return v[i] < v[j] })
		return v[len(v)/2]
	}
	b, _ := os.ReadFile("/proc/loadavg")
	t.Logf("MEASURE active rootfs server: Start %v, Stop %v, Discard %v (medians of %d, %d, %d; load %s)", med(starts), med(stops), med(discards), len(starts), len(stops), len(discards), strings.Join(strings.Fields(string(b))[:3], " "))
}
