package rootfs

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// A container that creates many files and never fsyncs them must not grow
// the server's memory per file: past freshMax the names are made durable
// with one syncfs and forgotten; later files are tracked again, and an
// fsync of an early file still works.
func TestFreshNamesBounded(t *testing.T) {
	needRoot(t)
	e := newEnv(t)
	cfg := activeCfg(e, nil)
	var r *rootFS
	cfg.onFS = func(fs *rootFS) { r = fs }
	serve(t, cfg)
	dir := filepath.Join(cfg.Mountpoint, "many")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < freshMax+10; i++ {
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprint(i)), []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	count := func() int {
		r.cowMu.Lock()
		defer r.cowMu.Unlock()
		return len(r.fresh)
	}
	// RELEASE is asynchronous: wait until the server closed every file
	// (a closed, never fsync'd file is remembered in r.fresh).
	settled(t, "region files still open", 0, func() int {
		r.cowMu.Lock()
		defer r.cowMu.Unlock()
		return len(r.open)
	})
	// The 2 s sync tick may have done this already; either way none is left.
	if err := r.syncFreshNames(); err != nil {
		t.Fatal(err)
	}
	if n := count(); n != 0 {
		t.Fatalf("%d names still tracked after syncFreshNames, want 0", n)
	}
	if err := os.WriteFile(filepath.Join(dir, "late"), []byte("y"), 0o644); err != nil {
		t.Fatal(err)
	}
	settled(t, "names tracked after a later create", 1, count)
	f, err := os.OpenFile(filepath.Join(dir, "0"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}
