package rootfs

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// xfsEnv is an env on a fresh loop-mounted xfs of size bytes (a sparse
// image) with reflink (skips when
// mkfs.xfs is missing: Debian package xfsprogs).
func xfsEnv(t *testing.T, size int64) *env {
	t.Helper()
	needRoot(t)
	mkfs, err := exec.LookPath("mkfs.xfs")
	if err != nil {
		t.Skip("mkfs.xfs not installed (apt-get install xfsprogs)")
	}
	tmp := t.TempDir()
	img, mnt := filepath.Join(tmp, "xfs.img"), filepath.Join(tmp, "xfs")
	if err := os.MkdirAll(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, size); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if out, err := exec.CommandContext(ctx, mkfs, "-q", "-m", "reflink=1", img).CombinedOutput(); err != nil {
		t.Skipf("mkfs.xfs: %v: %s", err, out)
	}
	if out, err := exec.CommandContext(ctx, "mount", "-o", "loop", img, mnt).CombinedOutput(); err != nil {
		t.Skipf("loop mount of xfs: %v: %s", err, out)
	}
	// Registered after the servers' cleanups run (LIFO): unmount last.
	t.Cleanup(func() {
		if err := syscall.Unmount(mnt, 0); err != nil {
			syscall.Unmount(mnt, syscall.MNT_DETACH)
		}
	})
	return newEnvIn(t, filepath.Join(mnt, "env"))
}

// withReflink turns reflink copy-up on for the test (in-process servers).
func withReflink(t *testing.T) {
	enableReflinkCopyUp(true)
	reflinkSwitch.off.Store(false)
	t.Cleanup(func() {
		enableReflinkCopyUp(os.Getenv(reflinkEnv) == "1")
		reflinkSwitch.off.Store(false)
	})
}

// On xfs a write into an image file clones the CAS object into a plain
// upper file: the merged bytes are right, almost no space is used, and the
// object itself is untouched.
func TestReflinkCopyUp(t *testing.T) {
	e := xfsEnv(t, 512<<20)
	withReflink(t)
	enableReflinkCopyUp(false) // the Config field below must turn it on
	const size = 32 << 20
	body := strings.Repeat("0123456789abcdef", size/16)
	l := e.addLayer(t, makeTar(t, []tarEntry{{name: "big", body: body}}))
	cfg := activeCfg(e, []digest.Digest{l})
	cfg.ReflinkCopyUp = true
	serve(t, cfg)

	var before syscall.Statfs_t
	if err := syscall.Statfs(e.dir, &before); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(cfg.Mountpoint, "big")
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	patch := bytes.Repeat([]byte("Z"), 4096)
	off := int64(8<<20 + 100)
	if _, err := f.WriteAt(patch, off); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	want := []byte(body)
	copy(want[off:], patch)
	got, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("read after the write differs from the merged bytes")
	}
	up := filepath.Join(cfg.StateDir, "upper", "big")
	if _, ok := readCowRef(up); ok {
		t.Fatal("the modified file is a region file: no reflink copy-up")
	}
	ondisk, err := os.ReadFile(up)
	if err != nil || !bytes.Equal(ondisk, want) {
		t.Fatalf("upper file does not hold the merged bytes (err %v)", err)
	}
	syscall.Sync()
	var after syscall.Statfs_t
	if err := syscall.Statfs(e.dir, &after); err != nil {
		t.Fatal(err)
	}
	used := (int64(before.Bfree) - int64(after.Bfree)) * before.Bsize
	t.Logf("xfs space used by the copy-up and a 4 KiB write into a %d MiB file: %d KiB", size>>20, used>>10)
	if used > 2<<20 {
		t.Fatalf("copy-up used %d KiB: data was copied, not cloned", used>>10)
	}
	obj, err := os.ReadFile(e.cas.Path(digest.FromString(body)))
	if err != nil || !bytes.Equal(obj, []byte(body)) {
		t.Fatalf("CAS object changed by a write to its clone (err %v)", err)
	}
}

// Where the filesystem has no reflink (ext4 here) the copy-up falls back
// to the region, once for all.
func TestReflinkFallback(t *testing.T) {
	needRoot(t)
	withReflink(t)
	e, layers, body := bigImage(t, 4<<20)
	cfg := activeCfg(e, layers)
	serve(t, cfg)
	var sf syscall.Statfs_t
	if err := syscall.Statfs(e.dir, &sf); err != nil {
		t.Fatal(err)
	}
	if sf.Type == 0x58465342 || sf.Type == 0x9123683e { // xfs, btrfs
		t.Skip("TMPDIR has reflink: nothing falls back")
	}
	p := filepath.Join(cfg.Mountpoint, "big")
	if err := os.WriteFile(p+".x", nil, 0o644); err != nil { // a new file: no copy-up
		t.Fatal(err)
	}
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("Q"), 5); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if _, ok := readCowRef(filepath.Join(cfg.StateDir, "upper", "big")); !ok {
		t.Fatal("no region file after a failed reflink")
	}
	if !reflinkSwitch.off.Load() {
		t.Fatal("reflink not switched off after the filesystem refused it")
	}
	got, err := os.ReadFile(p)
	if err != nil || string(got[:8]) != body[:5]+"Q"+body[6:8] {
		t.Fatalf("merged read wrong: %q (err %v)", got[:8], err)
	}
}

// A snapshot with a quota keeps the region path even where reflink works:
// a clone's writes would not count against the cap.
func TestReflinkNotWithQuota(t *testing.T) {
	e := xfsEnv(t, 512<<20)
	withReflink(t)
	l := e.addLayer(t, makeTar(t, []tarEntry{{name: "big", body: strings.Repeat("x", 1<<20)}}))
	cfg := activeCfg(e, []digest.Digest{l})
	cfg.MaxSize = 64 << 20
	serve(t, cfg)
	f, err := os.OpenFile(filepath.Join(cfg.Mountpoint, "big"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("y"), 10); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if _, ok := readCowRef(filepath.Join(cfg.StateDir, "upper", "big")); !ok {
		t.Fatal("a capped snapshot cloned an image file: its writes would bypass the cap")
	}
}
