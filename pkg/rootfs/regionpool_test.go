package rootfs

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func spareRegions(t *testing.T, pool string) int {
	t.Helper()
	des, _ := os.ReadDir(pool)
	n := 0
	for _, de := range des {
		if strings.HasPrefix(de.Name(), "r-") {
			n++
		}
	}
	return n
}

func waitSpares(t *testing.T, pool string, want int) {
	t.Helper()
	settled(t, "spare regions in the pool", want, func() int { return spareRegions(t, pool) })
}

// An active server refills the spare-region pool after mounting; the next
// one takes a spare as its region, which then keeps what it is given
// across a restart like a region created in place.
func TestRegionPool(t *testing.T) {
	needRoot(t)
	e := newEnv(t)
	layers := baseLayers(t, e)
	mroot := filepath.Join(e.dir, "manifests")
	pool := regionPoolDir(mroot, 0)
	cfg := func(name string) Config {
		dir := filepath.Join(e.dir, name)
		return Config{Mountpoint: filepath.Join(dir, "rootfs"), CASRoot: e.cas.Root(), ManifestRoot: mroot,
			Layers: layers, StateDir: filepath.Join(dir, "state")}
	}
	stop1 := serve(t, cfg("a"))
	waitSpares(t, pool, regionPoolSize)
	stop1()

	// Mark the spares to recognise the one b takes.
	des, _ := os.ReadDir(pool)
	for _, de := range des {
		os.WriteFile(filepath.Join(pool, de.Name(), "spare-marker"), nil, 0o600)
	}
	c := cfg("b")
	stop2 := serve(t, c)
	if _, err := os.Stat(filepath.Join(c.StateDir, "region", "spare-marker")); err != nil {
		t.Fatalf("b's region is not a spare: %v", err)
	}
	// b refilled the pool.
	waitSpares(t, pool, regionPoolSize)
	p := filepath.Join(c.Mountpoint, "etc", "new")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("kept in a spare region")
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if fi, err := os.Stat(filepath.Join(c.StateDir, "region")); err != nil || !fi.IsDir() {
		t.Fatalf("no region dir: %v", err)
	}
	stop2()
	serve(t, c)
	if b, err := os.ReadFile(p); err != nil || string(b) != "kept in a spare region" {
		t.Fatalf("after restart: %q %v", b, err)
	}
}

// takeSpareRegion never replaces an existing region, and a pool of
// another block size is not used.
func TestRegionPoolTake(t *testing.T) {
	dir := t.TempDir()
	mroot := filepath.Join(dir, "manifests")
	cfg := Config{ManifestRoot: mroot, StateDir: filepath.Join(dir, "state")}
	if takeSpareRegion(cfg) {
		t.Fatal("took a spare from no pool")
	}
	pool := regionPoolDir(mroot, 0)
	os.MkdirAll(filepath.Join(pool, "r-1"), 0o700)
	os.WriteFile(filepath.Join(pool, "r-1", "marker"), nil, 0o600)
	if takeSpareRegion(Config{ManifestRoot: mroot, StateDir: cfg.StateDir, BlockSize: 8192}) {
		t.Fatal("took a spare of another block size")
	}
	os.MkdirAll(cfg.StateDir, 0o700)
	if !takeSpareRegion(cfg) {
		t.Fatal("spare not taken")
	}
	if _, err := os.Stat(filepath.Join(cfg.regionDir(), "marker")); err != nil {
		t.Fatal("region dir is not the spare")
	}
	os.MkdirAll(filepath.Join(pool, "r-2"), 0o700)
	if takeSpareRegion(cfg) || spareRegions(t, pool) != 1 {
		t.Fatal("spare taken over an existing region")
	}
}
