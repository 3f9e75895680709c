package layout

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/dupsnap/dupsnap/pkg/cas"
)

// Adopting the staging dir's files (no copy) gives the same manifest as
// copying them, although adoption rewrites an inode's metadata while the
// walk is still going (the hardlink's second name must report the first
// name's mode, owner and xattrs); SkipDir omits a directory's entry only.
func TestFromDirAdopt(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	s, err := cas.Open(filepath.Join(root, "cas"), cas.Options{NoSync: true})
	must(t, err)
	defer s.Close()
	mk := func(dir string) {
		writeFile(t, filepath.Join(dir, "bin/a"), pseudoRandom(3, 3<<20), 0o4755)
		must(t, os.Link(filepath.Join(dir, "bin/a"), filepath.Join(dir, "bin/z")))
		must(t, unix.Setxattr(filepath.Join(dir, "bin/a"), "user.note", []byte("n"), 0))
		must(t, unix.Chmod(filepath.Join(dir, "bin/a"), 0o4755))
		writeFile(t, filepath.Join(dir, "etc/conf"), []byte("same"), 0o600)
		writeFile(t, filepath.Join(dir, "etc/conf2"), []byte("same"), 0o640)
		writeFile(t, filepath.Join(dir, "empty"), nil, 0o644)
		mtime := time.Unix(1700000000, 0)
		for _, p := range []string{"bin/a", "etc/conf", "etc/conf2", "empty", "bin", "etc"} {
			must(t, os.Chtimes(filepath.Join(dir, p), mtime, mtime))
		}
	}
	copied, adopted := filepath.Join(root, "copied"), filepath.Join(root, "cas", "staging")
	mk(copied)
	mk(adopted)
	want, err := fromDir(ctx, newMemCAS(), copied, DirOptions{})
	must(t, err)
	b := s.NewBatch()
	got, err := FromDirWith(ctx, b, adopted, DirOptions{Adopt: true})
	must(t, err)
	must(t, b.Commit(ctx))
	if got.DiffID != want.DiffID || len(got.Entries) != len(want.Entries) {
		t.Fatalf("adopted manifest %s (%d entries) differs from copied %s (%d)", got.DiffID, len(got.Entries), want.DiffID, len(want.Entries))
	}
	if z := entryByPath(got, "bin/z"); z == nil || z.Mode&0o7777 != 0o4755 || z.Xattrs["user.note"] != "n" {
		t.Fatalf("hardlink entry lost the inode's metadata: %+v", z)
	}
	a := entryByPath(got, "bin/a")
	var obj, st unix.Stat_t
	must(t, unix.Stat(s.Path(a.Digest), &obj))
	must(t, unix.Stat(filepath.Join(adopted, "bin/a"), &st))
	if obj.Ino != st.Ino {
		t.Fatal("bin/a was copied, not adopted")
	}

	skipped, err := FromDirWith(ctx, s.NewBatch(), copied, DirOptions{SkipDir: func(rel string, _ *unix.Stat_t, _ map[string]string) bool { return rel == "etc" }})
	must(t, err)
	if entryByPath(skipped, "etc") != nil || entryByPath(skipped, "etc/conf") == nil || len(skipped.Entries) != len(want.Entries)-1 {
		t.Fatalf("SkipDir: %d entries, etc %v", len(skipped.Entries), entryByPath(skipped, "etc"))
	}
}

// asyncHash equals sha256 over what was written, for sizes around its
// buffer, and its Sum never waits on a hasher that started late.
func TestAsyncHash(t *testing.T) {
	data := pseudoRandom(5, 3*asyncHashBuf+100)
	for i := 0; i < 300; i++ {
		n := []int{0, 1, asyncHashBuf - 1, asyncHashBuf, asyncHashBuf + 1, len(data)}[i%6]
		a := newAsyncHash()
		a.Write(data[:n/2])
		a.Write(data[n/2 : n])
		if got := digest.NewDigestFromBytes(digest.SHA256, a.Sum()); got != sha(data[:n]) {
			t.Fatalf("size %d: %s, want %s", n, got, sha(data[:n]))
		}
		a.Close()
	}
}
