package cas

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// TestBatchLink: an object of another store on the same filesystem joins a
// batch as a hard link (same inode, no copy), visible only at Commit;
// Abort leaves nothing; another format is copied and verified instead.
func TestBatchLink(t *testing.T) {
	ctx := testCtx(t)
	dir := t.TempDir()
	open := func(name string, opts Options) *Store {
		s, err := Open(filepath.Join(dir, name), opts)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	}
	stg := open("staging", Options{NoSync: true})
	node := open("node", Options{})
	small, big := randBytes(1, 5000), randBytes(2, 3<<20)
	for _, b := range [][]byte{small, big} {
		if _, err := stg.PutExpected(ctx, dgst(b), bytes.NewReader(b)); err != nil {
			t.Fatal(err)
		}
	}

	// Abort: nothing visible, no temp left.
	b := node.NewBatch()
	if err := b.Link(ctx, stg, dgst(small)); err != nil {
		t.Fatal(err)
	}
	if node.Has(dgst(small)) {
		t.Fatal("linked object visible before Commit")
	}
	b.Abort()
	if node.Has(dgst(small)) {
		t.Fatal("aborted link installed")
	}
	if ents, _ := os.ReadDir(filepath.Join(node.Root(), "tmp")); len(ents) != 0 {
		t.Fatalf("abort left %d temps", len(ents))
	}

	// Commit: both objects, same inodes as staging's; staging may drop them.
	b = node.NewBatch()
	for _, x := range [][]byte{small, big, small} {
		if err := b.Link(ctx, stg, dgst(x)); err != nil {
			t.Fatal(err)
		}
	}
	if err := b.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	for _, x := range [][]byte{small, big} {
		f1, err := node.OpenFile(dgst(x))
		if err != nil {
			t.Fatal(err)
		}
		f2, err := stg.OpenFile(dgst(x))
		if err != nil {
			t.Fatal(err)
		}
		if !os.SameFile(must(f1.Stat()), must(f2.Stat())) {
			t.Errorf("object %d bytes was copied, not linked", len(x))
		}
		f1.Close()
		f2.Close()
		if err := stg.Delete(dgst(x)); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(readAll(t, node, dgst(x)), x) {
			t.Fatal("content differs")
		}
	}
	// Present already: nothing to do.
	b = node.NewBatch()
	if err := b.Link(ctx, node, dgst(small)); err != nil {
		t.Fatal(err)
	}
	if err := b.Commit(ctx); err != nil {
		t.Fatal(err)
	}

	// Other format (compressed store): copied through PutExpected.
	z := open("z", Options{Compress: true, NoSync: true})
	if _, err := stg.PutExpected(ctx, dgst(big), bytes.NewReader(big)); err != nil {
		t.Fatal(err)
	}
	b = z.NewBatch()
	if err := b.Link(ctx, stg, dgst(big)); err != nil {
		t.Fatal(err)
	}
	if err := b.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(readAll(t, z, dgst(big)), big) {
		t.Fatal("copied content differs")
	}
	// Missing in src.
	if err := z.NewBatch().Link(ctx, stg, dgst([]byte("nope"))); err == nil {
		t.Fatal("link of a missing object succeeded")
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}
