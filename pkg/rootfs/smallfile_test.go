package rootfs

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// smallImage is an env with one layer: "s" and "t" (small files, "t" also
// hardlinked as "t2"), "m" (small, for mmap) and "dir" with 1000 entries.
func smallImage(t *testing.T) (*env, []digest.Digest) {
	t.Helper()
	e := newEnv(t)
	ents := []tarEntry{
		{name: "s", body: strings.Repeat("s", 5000)},
		{name: "t", body: "tiny"},
		{name: "t2", typ: '1', link: "t"},
		{name: "m", body: strings.Repeat("m", 8192)},
		{name: "dir/", typ: '5'},
	}
	for i := 0; i < 1000; i++ {
		ents = append(ents, tarEntry{name: fmt.Sprintf("dir/%c%s%04d", 'a'+i%26, strings.Repeat("x", 60), i), body: "e"})
	}
	return e, []digest.Digest{e.addLayer(t, makeTar(t, ents))}
}

// opCount is the server's count of op so far (in-process server).
func opCount(t *testing.T, mp, op string) uint64 {
	t.Helper()
	time.Sleep(3 * statsInterval)
	st, err := ReadStats(mp)
	if err != nil {
		t.Fatal(err)
	}
	return st.Ops[op].Count
}

// A small image file is a cached FUSE file: a writer through another fd
// (copy-up into the region) is seen at once by an open reader, a new
// open, a hard link and an mmap; nothing stale survives in the page cache.
func TestSmallFileCoherentAfterWrite(t *testing.T) {
	needRoot(t)
	e, layers := smallImage(t)
	cfg := activeCfg(e, layers)
	serveProc(t, cfg) // mmaps: see serveProc
	mp := cfg.Mountpoint
	p := filepath.Join(mp, "s")
	r, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	buf := make([]byte, 8)
	if _, err := r.ReadAt(buf, 0); err != nil || string(buf) != "ssssssss" {
		t.Fatalf("first read %q %v", buf, err)
	}
	mm, err := syscall.Mmap(int(r.Fd()), 0, 5000, syscall.PROT_READ, syscall.MAP_SHARED)
	if err != nil {
		t.Fatalf("mmap of a small image file: %v", err)
	}
	defer syscall.Munmap(mm)
	if string(mm[:4]) != "ssss" {
		t.Fatalf("mmap reads %q", mm[:4])
	}
	if err := pwriteFile(p, []byte("NEW!"), 2); err != nil {
		t.Fatal(err)
	}
	if _, err := r.ReadAt(buf, 0); err != nil || string(buf) != "ssNEW!ss" {
		t.Fatalf("open reader after a write through another fd: %q %v", buf, err)
	}
	if string(mm[:8]) != "ssNEW!ss" {
		t.Fatalf("mmap after a write through another fd: %q", mm[:8])
	}
	b, err := os.ReadFile(p)
	if err != nil || len(b) != 5000 || string(b[:8]) != "ssNEW!ss" {
		t.Fatalf("new open after the write: %q %v", b[:8], err)
	}
	// O_TRUNC and a shorter rewrite.
	if err := os.WriteFile(p, []byte("short"), 0o644); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(p); err != nil || string(b) != "short" {
		t.Fatalf("after truncate+write: %q %v", b, err)
	}
	n, err := r.ReadAt(buf, 0)
	if string(buf[:n]) != "short" {
		t.Fatalf("open reader after truncate: %q %v", buf[:n], err)
	}

	// Hard links share the inode and so the page cache.
	if b, err := os.ReadFile(filepath.Join(mp, "t2")); err != nil || string(b) != "tiny" {
		t.Fatalf("t2: %q %v", b, err)
	}
	if err := pwriteFile(filepath.Join(mp, "t"), []byte("TI"), 0); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(mp, "t2")); err != nil || string(b) != "TIny" {
		t.Fatalf("hard link after a write through the other name: %q %v", b, err)
	}

	// Unlink and rename of an open, cached file.
	m, err := os.Open(filepath.Join(mp, "m"))
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := os.Rename(filepath.Join(mp, "m"), filepath.Join(mp, "m2")); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(mp, "m2")); err != nil || !bytes.Equal(b, bytes.Repeat([]byte("m"), 8192)) {
		t.Fatalf("renamed small file: %v", err)
	}
	if err := os.Remove(filepath.Join(mp, "m2")); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 8192)
	if k, err := m.ReadAt(got, 0); k != 8192 || !bytes.Equal(got, bytes.Repeat([]byte("m"), 8192)) {
		t.Fatalf("read of an unlinked open small file: %d %v", k, err)
	}
}

// Reading a small image file must not cost a GETATTR at its next lstat
// (cached file: no atime invalidation), while with PassthroughMinSize 0
// the same file is passthrough and does (Linux >= 6.9 invalidates the
// atime of a passthrough file at every read): the threshold is honoured.
func TestSmallFileThreshold(t *testing.T) {
	needRoot(t)
	old := statsInterval
	statsInterval = 20 * time.Millisecond
	t.Cleanup(func() { statsInterval = old })
	e, layers := smallImage(t)
	getattrsAfterRead := func(cfg Config) uint64 {
		stop := serve(t, cfg)
		defer stop()
		p := filepath.Join(cfg.Mountpoint, "s")
		if b, err := os.ReadFile(p); err != nil || len(b) != 5000 {
			t.Fatalf("read: %d %v", len(b), err)
		}
		if _, err := os.Lstat(p); err != nil {
			t.Fatal(err)
		}
		before := opCount(t, cfg.Mountpoint, "getattr")
		for i := 0; i < 3; i++ {
			if b, err := os.ReadFile(p); err != nil || len(b) != 5000 {
				t.Fatalf("read: %d %v", len(b), err)
			}
			if _, err := os.Lstat(p); err != nil {
				t.Fatal(err)
			}
		}
		return opCount(t, cfg.Mountpoint, "getattr") - before
	}
	cfg := activeCfg(e, layers)
	if n := getattrsAfterRead(cfg); n != 0 {
		t.Errorf("default threshold: %d GETATTRs after reads of a small file, want 0", n)
	}
	zero := int64(0)
	cfg = activeCfg(e, layers)
	cfg.Mountpoint = filepath.Join(e.dir, "pt", "rootfs")
	cfg.StateDir = filepath.Join(e.dir, "pt", "state")
	cfg.PassthroughMinSize = &zero
	if n := getattrsAfterRead(cfg); n < 3 {
		t.Errorf("PassthroughMinSize 0: %d GETATTRs after 3 passthrough reads, want >= 3 (file not passthrough?)", n)
	}
}

// Directories are opened by the kernel alone (no OPENDIR): listings are
// cached yet follow every change, and removing entries while listing
// (rm -r of a large directory) sees each entry exactly once.
func TestDirListingNoOpendir(t *testing.T) {
	needRoot(t)
	e, layers := smallImage(t)
	cfg := activeCfg(e, layers)
	serve(t, cfg)
	dir := filepath.Join(cfg.Mountpoint, "dir")
	names := func() []string {
		ents, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, e := range ents {
			out = append(out, e.Name())
		}
		return out
	}
	if n := len(names()); n != 1000 {
		t.Fatalf("listed %d entries, want 1000", n)
	}
	if err := os.WriteFile(filepath.Join(dir, "new"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	gone := "a" + strings.Repeat("x", 60) + "0000"
	if err := os.Remove(filepath.Join(dir, gone)); err != nil {
		t.Fatal(err)
	}
	got := "," + strings.Join(names(), ",") + ","
	if !strings.Contains(got, ",new,") || strings.Contains(got, ","+gone+",") {
		t.Fatalf("listing after create+unlink is stale: %.80s...", got)
	}
	// A change right before the loop below: its listing is not cached.
	if err := os.WriteFile(filepath.Join(dir, "new2"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	// Remove in small batches while listing, like rm -r: every entry must
	// be seen once.
	d, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]int{}
	for {
		batch, err := d.Readdirnames(7)
		for _, n := range batch {
			seen[n]++
			if err := os.Remove(filepath.Join(dir, n)); err != nil {
				t.Fatal(err)
			}
		}
		if err != nil || len(batch) == 0 {
			break
		}
	}
	d.Close()
	if err := os.Remove(dir); err != nil {
		t.Fatalf("rmdir after removing every listed entry: %v (%d names seen)", err, len(seen))
	}
	if len(seen) != 1001 || seen["new2"] != 1 {
		t.Errorf("saw %d names while removing, want 1001 with new2", len(seen))
	}
	for n, c := range seen {
		if c != 1 {
			t.Errorf("%s listed %d times", n, c)
		}
	}
	// syncfs and fsync of a directory reach the server without a handle.
	root, err := os.Open(cfg.Mountpoint)
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	if err := root.Sync(); err != nil {
		t.Fatalf("fsync of the root dir: %v", err)
	}
}
