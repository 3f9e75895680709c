package integration

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

	"github.com/dupsnap/dupsnap/integration/harness"
)

// TestRootfsRenameOpenRace: a reader opens /counter while a writer keeps
// replacing it (`echo > counter.tmp; mv counter.tmp counter`, as
// TestRestart's container does). On a local fs every open either sees the
// old or the new file. The reader's LOOKUP returns the old node, the RENAME
// takes its name; its OPEN used to resolve the nameless node to the root dir
// (EISDIR, EINVAL). pkg/rootfs now keeps the old file until the kernel
// forgets the node (pkg/rootfs TestRenameOverOpenRace is the unit version).
func TestRootfsRenameOpenRace(t *testing.T) {
	harness.Require(t, harness.DupsnapBin())
	dir := harness.TempDir(t, "rename-race")
	mnt := filepath.Join(dir, "mnt")
	if err := os.MkdirAll(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	cfg := `{"mountpoint":"` + mnt + `","cas_root":"` + filepath.Join(dir, "cas") +
		`","manifest_root":"` + filepath.Join(dir, "manifests") + `","layers":[],"state_dir":"` + filepath.Join(dir, "state") + `"}`
	cfgPath := filepath.Join(dir, "rootfs.json")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	p := harness.StartProc(t, "rootfs", filepath.Join(dir, "rootfs.log"), nil, harness.DupsnapBin(), "rootfs", "--config", cfgPath)
	deadline := time.Now().Add(10 * time.Second)
	for len(harness.MountsUnder(mnt)) == 0 {
		if p.Exited() || time.Now().After(deadline) {
			t.Fatalf("rootfs did not mount:\n%s", p.Tail())
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Cleanup(func() { harness.UnmountUnder(mnt) })

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	counter, tmp := filepath.Join(mnt, "counter"), filepath.Join(mnt, "counter.tmp")
	if err := os.WriteFile(counter, []byte("0\n"), 0o644); err != nil {
		t.Fatal(err)
	}
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
		if _, err := os.ReadFile(counter); err != nil {
			var errno syscall.Errno
			if errors.As(err, &errno) {
				bad[errno.Error()]++
			} else {
				bad[err.Error()]++
			}
		}
	}
	wg.Wait()
	if len(bad) > 0 {
		t.Errorf("%d reads of a file replaced by rename: errors %v", reads, bad)
	}
}
