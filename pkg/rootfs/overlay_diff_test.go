package rootfs

import (
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// mountOverlay mounts an overlayfs rootfs (lower read-only, upper/work in
// dir) at mp, unmounted in t.Cleanup. redirect_dir and index make dir
// renames and hardlinks behave as on a local fs, as containerd's overlay
// snapshotter on a modern kernel does.
func mountOverlay(t *testing.T, lower, dir, mp string) (remount func()) {
	t.Helper()
	up, work := filepath.Join(dir, "upper"), filepath.Join(dir, "work")
	for _, d := range []string{up, work, mp} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	opts := "lowerdir=" + lower + ",upperdir=" + up + ",workdir=" + work + ",redirect_dir=on,index=on"
	mount := func() {
		if err := syscall.Mount("overlay", mp, "overlay", 0, opts); err != nil {
			t.Skipf("overlayfs (%s): %v", opts, err)
		}
	}
	mount()
	t.Cleanup(func() { syscall.Unmount(mp, syscall.MNT_DETACH) })
	return func() {
		if err := syscall.Unmount(mp, 0); err != nil {
			t.Fatalf("unmount overlay: %v", err)
		}
		mount()
	}
}

// TestOverlayDifferential runs the seeded random operations of
// TestActiveDifferential on a dupsnap rootfs and on an overlayfs rootfs of
// the same image (its merged tree extracted into the lower dir), and
// compares the trees after each sequence and after a remount of both.
func TestOverlayDifferential(t *testing.T) {
	needRoot(t)
	e := newEnv(t)
	layers := baseLayers(t, e)
	lower := extractLower(t, e, layers)

	cfg := Config{Mountpoint: filepath.Join(e.dir, "active", "rootfs"), CASRoot: e.cas.Root(),
		ManifestRoot: filepath.Join(e.dir, "manifests"), Layers: layers, StateDir: filepath.Join(e.dir, "active", "state")}
	stop := serveProc(t, cfg) // randomOps mmaps: see serveProc
	ovl := filepath.Join(e.dir, "ovl", "rootfs")
	remountOvl := mountOverlay(t, lower, filepath.Join(e.dir, "ovl"), ovl)
	compareTrees(t, "initial", cfg.Mountpoint, ovl)
	for seed := int64(1); seed <= 6; seed++ {
		randomOps(t, seed, 120, [2]string{cfg.Mountpoint, ovl})
		compareTrees(t, fmt.Sprintf("after seed %d", seed), cfg.Mountpoint, ovl)
		if t.Failed() {
			return
		}
	}
	stop()
	serveProc(t, cfg)
	remountOvl()
	compareTrees(t, "after remount", cfg.Mountpoint, ovl)
}
