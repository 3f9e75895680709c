package rootfs

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"
)

// TestRenameOverOpenRace: a reader opens "counter" while a writer keeps
// replacing it (write counter.tmp; mv counter.tmp counter). The reader's
// node loses its name in the rename; its open must not resolve the
// nameless node to the root dir (EISDIR/EINVAL) but fail ESTALE, which the
// kernel retries with a fresh lookup: every read sees some whole version.
func TestRenameOverOpenRace(t *testing.T) {
	needRoot(t)
	e := newEnv(t)
	dir := filepath.Join(e.dir, "snap")
	cfg := Config{Mountpoint: filepath.Join(dir, "rootfs"), CASRoot: e.cas.Root(),
		ManifestRoot: filepath.Join(e.dir, "manifests"), StateDir: filepath.Join(dir, "state")}
	serve(t, cfg)
	counter, tmp := filepath.Join(cfg.Mountpoint, "counter"), filepath.Join(cfg.Mountpoint, "counter.tmp")
	if err := os.WriteFile(counter, []byte("0\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 1; ctx.Err() == nil; i++ {
			if err := os.WriteFile(tmp, []byte(strconv.Itoa(i)+"\n"), 0o644); err != nil {
				t.Errorf("write: %v", err)
				return
			}
			if err := os.Rename(tmp, counter); err != nil {
				t.Errorf("rename: %v", err)
				return
			}
		}
	}()
	bad := map[string]int{}
	reads := 0
	for ctx.Err() == nil {
		reads++
		b, err := os.ReadFile(counter)
		var errno syscall.Errno
		switch {
		case errors.As(err, &errno):
			bad[errno.Error()]++
		case err != nil:
			bad[err.Error()]++
		case len(b) == 0 || b[len(b)-1] != '\n':
			bad["torn content "+strconv.Quote(string(b))]++
		}
	}
	cancel()
	wg.Wait()
	if len(bad) > 0 {
		t.Fatalf("%d reads, failures: %v", reads, bad)
	}
	t.Logf("%d reads, all fine", reads)
}
