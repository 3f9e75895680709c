package layout

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// TestFromDirMerge builds a lower layer with GNU tar and an overlay-format
// upper dir (whiteout device, opaque xattr, xattrs, hardlinks), turns the
// upper into a manifest, checks its synthesised tar, then merges both.
func TestFromDirMerge(t *testing.T) {
	ctx := context.Background()
	lower := t.TempDir()
	writeFile(t, filepath.Join(lower, "etc/passwd"), []byte("root:x:0:0\n"), 0o644)
	writeFile(t, filepath.Join(lower, "etc/gone"), []byte("bye"), 0o644)
	writeFile(t, filepath.Join(lower, "opq/old1"), []byte("old"), 0o644)
	writeFile(t, filepath.Join(lower, "opq/sub/old2"), []byte("old"), 0o644)
	writeFile(t, filepath.Join(lower, "keep/file"), []byte("kept"), 0o644)
	lowerTar := run(t, lower, "tar", "-c", "-f", "-", "--format=posix", "--numeric-owner", ".")

	upper := t.TempDir()
	writeFile(t, filepath.Join(upper, "etc/passwd"), []byte("root:x:0:0\nuser:x:1000:1000\n"), 0o600)
	mknod(t, filepath.Join(upper, "etc/gone"), unix.S_IFCHR, 0, 0)
	must(t, os.MkdirAll(filepath.Join(upper, "opq"), 0o750))
	must(t, unix.Setxattr(filepath.Join(upper, "opq"), "trusted.overlay.opaque", []byte("y"), 0))
	writeFile(t, filepath.Join(upper, "opq/new"), []byte("new"), 0o644)
	writeFile(t, filepath.Join(upper, "bin/a"), pseudoRandom(7, 10000), 0o755)
	must(t, os.Link(filepath.Join(upper, "bin/a"), filepath.Join(upper, "bin/b")))
	capab := string([]byte{1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0})
	must(t, unix.Setxattr(filepath.Join(upper, "bin/a"), "security.capability", []byte(capab), 0))
	must(t, unix.Setxattr(filepath.Join(upper, "bin/a"), "user.note", []byte("n"), 0))
	must(t, os.Symlink("a", filepath.Join(upper, "bin/c")))
	must(t, unix.Mkfifo(filepath.Join(upper, "fifo"), 0o600))

	mc := newMemCAS()
	m, err := fromDir(ctx, mc, upper, DirOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var tarOut bytes.Buffer
	must(t, Export(ctx, mc, m, &tarOut))
	if sha(tarOut.Bytes()) != m.DiffID || int64(tarOut.Len()) != m.Size {
		t.Fatalf("export of synthesised layer does not hash to its DiffID")
	}
	// The synthesised tar is a valid layer: it ingests back to the same manifest.
	m2 := roundTrip(t, tarOut.Bytes(), tarOut.Bytes())
	if len(m2.Entries) != len(m.Entries) {
		t.Fatalf("re-ingest: %d entries, want %d", len(m2.Entries), len(m.Entries))
	}
	// GNU tar reads it too, and sees the markers and the xattrs.
	list := string(runIn(t, tarOut.Bytes(), "tar", "-t", "-v", "--xattrs", "-f", "-"))
	for _, want := range []string{"etc/.wh.gone", "opq/.wh..wh..opq", "bin/b link to bin/a", "bin/c -> a", "fifo"} {
		if !bytes.Contains([]byte(list), []byte(want)) {
			t.Errorf("tar -t lacks %q:\n%s", want, list)
		}
	}
	// Deterministic: same dir, same diffID.
	m3, err := fromDir(ctx, newMemCAS(), upper, DirOptions{})
	must(t, err)
	if m3.DiffID != m.DiffID {
		t.Fatalf("FromDir not deterministic: %s vs %s", m3.DiffID, m.DiffID)
	}
	a := entryByPath(m, "bin/a")
	if a == nil || a.Xattrs["security.capability"] != capab || a.Xattrs["user.note"] != "n" {
		t.Fatalf("xattrs of bin/a: %+v", a)
	}
	if o := entryByPath(m, "opq"); o == nil || o.Xattrs["trusted.overlay.opaque"] != "" {
		t.Fatalf("overlay xattr leaked into the layer: %+v", o)
	}

	ml := roundTrip(t, lowerTar, lowerTar)
	tree, err := Merge([]*Manifest{ml, m})
	must(t, err)
	if tree.Lookup("etc/gone") != nil {
		t.Error("whiteout did not delete etc/gone")
	}
	if n := tree.Lookup("etc/passwd"); n == nil || n.Entry.Size != 28 || n.Entry.Mode != 0o600 {
		t.Errorf("etc/passwd not replaced: %+v", n)
	}
	if tree.Lookup("opq/old1") != nil || tree.Lookup("opq/sub") != nil {
		t.Error("opaque dir did not hide lower children")
	}
	if tree.Lookup("opq/new") == nil || tree.Lookup("keep/file") == nil {
		t.Error("lost entries")
	}
	na, nb := tree.Lookup("bin/a"), tree.Lookup("bin/b")
	if na == nil || na != nb || na.Nlink != 2 {
		t.Fatalf("hardlinks not one node: %p %p", na, nb)
	}
	if tree.Root.Ino != 1 {
		t.Error("root ino")
	}
}

func runIn(t *testing.T, stdin []byte, name string, args ...string) []byte {
	t.Helper()
	f := filepath.Join(t.TempDir(), "in")
	must(t, os.WriteFile(f, stdin, 0o600))
	return run(t, "", "sh", append([]string{"-c", `f="$1"; shift; exec "$@" < "$f"`, "sh", f, name}, args...)...)
}
