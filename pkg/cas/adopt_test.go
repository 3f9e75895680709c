package cas

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// AdoptFile: the staging file's inode becomes the object (no copy, 0444,
// no xattrs), content already stored or adopted twice is dropped, the tee
// sees every byte, and Abort leaves no temp behind.
func TestAdoptFile(t *testing.T) {
	ctx := testCtx(t)
	s := openStore(t, Options{})
	stage := filepath.Join(s.Root(), "stage") // same filesystem as the store
	if err := os.Mkdir(stage, 0o755); err != nil {
		t.Fatal(err)
	}
	write := func(name string, data []byte) *os.File {
		p := filepath.Join(stage, name)
		if err := os.WriteFile(p, data, 0o4755); err != nil {
			t.Fatal(err)
		}
		unix.Setxattr(p, "user.test", []byte("x"), 0) // best effort: tmpfs may refuse
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		return f
	}
	big := randBytes(1, 3<<20+17)
	small := []byte("hello adopt")
	present := []byte("already there")
	if _, _, err := s.Put(ctx, bytes.NewReader(present)); err != nil {
		t.Fatal(err)
	}

	b := s.NewBatch()
	var tee bytes.Buffer
	fa, fb, fc, fd := write("a", big), write("b", small), write("c", small), write("d", present)
	d, n, err := b.AdoptFile(ctx, fa, &tee)
	if err != nil || d != dgst(big) || n != int64(len(big)) || !bytes.Equal(tee.Bytes(), big) {
		t.Fatalf("adopt big: %v %v %d tee %d", err, d, n, tee.Len())
	}
	for _, f := range []*os.File{fb, fc, fd} {
		if _, _, err := b.AdoptFile(ctx, f, nil); err != nil {
			t.Fatal(err)
		}
	}
	if s.Has(dgst(big)) {
		t.Fatal("adopted object visible before Commit")
	}
	if err := b.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if got := tmpNames(t, s); len(got) != 0 {
		t.Fatalf("temps left: %v", got)
	}
	for _, c := range [][]byte{big, small, present} {
		if !bytes.Equal(readAll(t, s, dgst(c)), c) {
			t.Fatalf("object %s content differs", dgst(c))
		}
	}
	var obj, staged unix.Stat_t
	if err := unix.Stat(s.Path(dgst(big)), &obj); err != nil {
		t.Fatal(err)
	}
	unix.Stat(fa.Name(), &staged)
	if obj.Ino != staged.Ino || obj.Mode&07777 != objectMode || obj.Uid != 0 && os.Getuid() == 0 {
		t.Fatalf("object not the adopted inode with object mode: ino %d/%d mode %o uid %d", obj.Ino, staged.Ino, obj.Mode&07777, obj.Uid)
	}
	if sz, _ := unix.Listxattr(s.Path(dgst(big)), nil); sz > 0 {
		t.Fatalf("adopted object keeps xattrs (%d bytes of names)", sz)
	}
	var st unix.Stat_t
	unix.Stat(s.Path(dgst(small)), &st)
	if st.Nlink != 2 { // object + one staging name: the second adopt was dropped
		t.Fatalf("small object nlink %d, want 2", st.Nlink)
	}
	unix.Stat(s.Path(dgst(present)), &st)
	if st.Nlink != 1 {
		t.Fatalf("present object got another link (nlink %d)", st.Nlink)
	}

	b = s.NewBatch()
	other := []byte("aborted content")
	if _, _, err := b.AdoptFile(ctx, write("e", other), nil); err != nil {
		t.Fatal(err)
	}
	b.Abort()
	if s.Has(dgst(other)) || len(tmpNames(t, s)) != 0 {
		t.Fatal("abort left the object or a temp")
	}
}
