package rootfs

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// bigImage is an env with one layer holding a size-byte patterned file
// "big" and a small file "small".
func bigImage(t *testing.T, size int) (*env, []digest.Digest, string) {
	t.Helper()
	e := newEnv(t)
	body := strings.Repeat("0123456789abcdef", size/16)
	l := e.addLayer(t, makeTar(t, []tarEntry{{name: "big", body: body}, {name: "small", body: "small file"}}))
	return e, []digest.Digest{l}, body
}

func activeCfg(e *env, layers []digest.Digest) Config {
	return Config{Mountpoint: filepath.Join(e.dir, "active", "rootfs"), CASRoot: e.cas.Root(),
		ManifestRoot: filepath.Join(e.dir, "manifests"), Layers: layers, StateDir: filepath.Join(e.dir, "active", "state")}
}

// A 4 KiB write into a 64 MiB image file costs a block or two of region,
// not a copy of the file.
func TestCowSmallWriteUsage(t *testing.T) {
	needRoot(t)
	e, layers, body := bigImage(t, 64<<20)
	cfg := activeCfg(e, layers)
	serve(t, cfg)
	p := filepath.Join(cfg.Mountpoint, "big")
	before, _, err := Usage(cfg)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	patch := bytes.Repeat([]byte("Z"), 4096)
	off := int64(32<<20 + 100) // unaligned: touches two blocks
	if _, err := f.WriteAt(patch, off); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	after, files, err := Usage(cfg)
	if err != nil {
		t.Fatal(err)
	}
	grew := after - before
	t.Logf("region usage grew by %d bytes for a 4 KiB write into a 64 MiB image file (%d region files)", grew, files)
	if grew <= 0 || grew > 2*4096 {
		t.Fatalf("usage grew by %d bytes, want 4096..8192", grew)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(filepath.Join(cfg.StateDir, "upper", "big"), &st); err != nil {
		t.Fatal(err)
	}
	if st.Size != 0 || st.Blocks > 8 { // an ext4 xattr block at most
		t.Fatalf("upper placeholder has size %d, %d blocks: data was copied up", st.Size, st.Blocks)
	}
	got := make([]byte, 3*4096)
	if _, err := f.ReadAt(got, off-4096); err != nil {
		t.Fatal(err)
	}
	want := []byte(body[off-4096 : off+8192])
	copy(want[4096:], patch)
	if !bytes.Equal(got, want) {
		t.Fatal("merged read around the patch differs")
	}
	if fi, _ := f.Stat(); fi.Size() != int64(len(body)) {
		t.Fatalf("size %d", fi.Size())
	}
	// Commit while mounted, with an unsynced write: Changes makes the live
	// server commit, and the layer holds the merged bytes.
	if _, err := f.WriteAt([]byte("tail"), int64(len(body))-4); err != nil {
		t.Fatal(err)
	}
	b := e.cas.NewBatch()
	m, err := Changes(context.Background(), cfg, b)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Commit(context.Background()); err != nil {
		t.Fatal(err)
	}
	merged := []byte(body)
	copy(merged[off:], patch)
	copy(merged[len(merged)-4:], "tail")
	found := false
	for _, en := range m.Entries {
		if en.Path == "big" {
			found = true
			if en.Digest != digest.FromBytes(merged) || en.Size != int64(len(merged)) {
				t.Fatalf("committed big: %s %d, want the merged content", en.Digest, en.Size)
			}
		}
	}
	if !found || len(m.Entries) != 1 {
		t.Fatalf("changes: %d entries, big found %v", len(m.Entries), found)
	}
}

// Past the cap writes fail with ENOSPC, statfs reports the cap, and space
// freed by an unlink is usable again.
func TestCowQuota(t *testing.T) {
	needRoot(t)
	e, layers, _ := bigImage(t, 1<<20)
	cfg := activeCfg(e, layers)
	cfg.MaxSize, cfg.Reserve = 2<<20, 1<<20
	serve(t, cfg)
	var sfs syscall.Statfs_t
	if err := syscall.Statfs(cfg.Mountpoint, &sfs); err != nil {
		t.Fatal(err)
	}
	if got := int64(sfs.Blocks) * sfs.Bsize; got != cfg.MaxSize {
		t.Fatalf("statfs total %d, want the cap %d", got, cfg.MaxSize)
	}
	p := filepath.Join(cfg.Mountpoint, "fill")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64<<10)
	var n int64
	for n < 4<<20 {
		k, err := f.Write(buf)
		n += int64(k)
		if err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatalf("write at %d: %v, want ENOSPC", n, err)
			}
			break
		}
	}
	f.Close()
	if n >= 4<<20 || n < 1<<20 {
		t.Fatalf("wrote %d bytes with a 2 MiB cap", n)
	}
	if err := syscall.Statfs(cfg.Mountpoint, &sfs); err != nil {
		t.Fatal(err)
	}
	if sfs.Bavail*uint64(sfs.Bsize) > 128<<10 {
		t.Fatalf("statfs shows %d bytes free at the cap", sfs.Bavail*uint64(sfs.Bsize))
	}
	// A write into an image file also needs region space.
	if err := pwriteFile(filepath.Join(cfg.Mountpoint, "big"), buf, 0); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("image file write at the cap: %v, want ENOSPC", err)
	}
	if err := os.Remove(p); err != nil {
		t.Fatal(err)
	}
	// The kernel sends RELEASE for the closed "fill" asynchronously, and
	// an unlinked file's blocks are freed at its last release: allow that
	// request to arrive.
	for deadline := time.Now().Add(3 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		err := pwriteFile(filepath.Join(cfg.Mountpoint, "big"), buf, 0)
		if err == nil {
			break
		}
		if !errors.Is(err, syscall.ENOSPC) || time.Now().After(deadline) {
			t.Fatalf("write after freeing space: %v", err)
		}
	}
	t.Logf("cap 2 MiB: wrote %d bytes before ENOSPC", n)
}

// A clean image file open for reading is passthrough to its CAS object;
// a writable open of the same inode must still work (go-fuse would hand
// it the read-only backing file) and later opens see the new content.
func TestCowWriteWhilePassthroughReader(t *testing.T) {
	needRoot(t)
	e, layers, body := bigImage(t, 1<<20)
	cfg := activeCfg(e, layers)
	serve(t, cfg)
	p := filepath.Join(cfg.Mountpoint, "big")
	r, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	head := make([]byte, 16)
	r.ReadAt(head, 0)
	w, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.WriteAt([]byte("NEW!"), 0); err != nil {
		t.Fatalf("write next to a passthrough reader: %v", err)
	}
	got := make([]byte, 8)
	if _, err := w.ReadAt(got, 0); err != nil || string(got) != "NEW!4567" {
		t.Fatalf("read back through the writer: %q %v", got, err)
	}
	w.Close()
	b, err := os.ReadFile(p)
	if err != nil || string(b[:8]) != "NEW!4567" || string(b[8:]) != body[8:] {
		t.Fatalf("new open after the write: %q %v", b[:8], err)
	}
	// The passthrough reader may keep the old content (documented).
	r.ReadAt(head, 0)
	t.Logf("old passthrough reader sees %q", head[:8])
}

// An unlinked file stays readable and writable through its open handle;
// its region blocks go at the last close (usage returns to zero), and a
// hardlinked image file keeps one region file for all its names.
func TestCowUnlinkOpenAndHardlink(t *testing.T) {
	needRoot(t)
	e, layers, body := bigImage(t, 1<<20)
	cfg := activeCfg(e, layers)
	serve(t, cfg)
	mp := cfg.Mountpoint
	commit := func() int64 {
		d, err := os.Open(mp)
		if err != nil {
			t.Fatal(err)
		}
		d.Sync()
		d.Close()
		u, _, err := Usage(cfg)
		if err != nil {
			t.Fatal(err)
		}
		return u
	}
	f, err := os.Create(filepath.Join(mp, "tmpfile"))
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("d"), 1<<20)
	if _, err := f.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(mp, "tmpfile")); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("after"), 10); err != nil {
		t.Fatalf("write after unlink: %v", err)
	}
	got := make([]byte, 8)
	if _, err := f.ReadAt(got, 8); err != nil || string(got) != "ddafterd" {
		t.Fatalf("read after unlink: %q %v", got, err)
	}
	if u := commit(); u < 1<<20 {
		t.Fatalf("usage %d while the unlinked file is open", u)
	}
	f.Close()
	// RELEASE is asynchronous in FUSE: close(2) returns before the server
	// has seen it.
	u := commit()
	for deadline := time.Now().Add(3 * time.Second); u != 0 && time.Now().Before(deadline); u = commit() {
		time.Sleep(20 * time.Millisecond)
	}
	if u != 0 {
		t.Fatalf("usage %d after the last close of an unlinked file", u)
	}

	// hardlink an image file, write through the new name, unlink the old.
	if err := os.Link(filepath.Join(mp, "big"), filepath.Join(mp, "big2")); err != nil {
		t.Fatal(err)
	}
	if err := pwriteFile(filepath.Join(mp, "big2"), []byte("LINK"), 4096); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(mp, "big"))
	if err != nil || string(b[4096:4100]) != "LINK" || string(b[4100:8192]) != body[4100:8192] {
		t.Fatalf("write through one name not seen through the other: %q %v", b[4096:4100], err)
	}
	if err := os.Remove(filepath.Join(mp, "big")); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(mp, "big2"), filepath.Join(mp, "moved")); err != nil {
		t.Fatal(err)
	}
	b, err = os.ReadFile(filepath.Join(mp, "moved"))
	if err != nil || string(b[4096:4100]) != "LINK" || len(b) != len(body) {
		t.Fatalf("after unlink+rename: %v", err)
	}
	if u := commit(); u != 4096 {
		t.Fatalf("usage %d, want one block for the hardlinked file", u)
	}
	if err := os.Remove(filepath.Join(mp, "moved")); err != nil {
		t.Fatal(err)
	}
	if u := commit(); u != 0 {
		t.Fatalf("usage %d after removing the last name", u)
	}
}
