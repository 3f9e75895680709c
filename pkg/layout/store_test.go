package layout

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/dupsnap/dupsnap/pkg/cas"
)

func TestStoreDedupExportCollect(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	c, s, err := OpenRoot(root)
	must(t, err)
	defer c.Close()

	shared := pseudoRandom(11, 300000)
	l1 := mkTar(t, file("app/shared.bin", string(shared)), file("app/one", "only in layer one"), file("empty", ""))
	l2 := mkTar(t, file("other/path/shared.bin", string(shared)), file("two", string(pseudoRandom(12, 5000))))

	m1, st1, err := s.ImportWithStats(ctx, bytes.NewReader(gz(t, l1)), IngestOptions{})
	must(t, err)
	if st1.NewBytes != int64(len(shared))+17 {
		t.Fatalf("layer 1 new bytes %d", st1.NewBytes)
	}
	m2, st2, err := s.ImportWithStats(ctx, bytes.NewReader(zst(t, l2)), IngestOptions{})
	must(t, err)
	// The shared file is stored once: layer 2 adds only its own file.
	if st2.NewBytes != 5000 || st2.NewObjects != 1 {
		t.Fatalf("layer 2 added %d bytes in %d objects, want 5000 in 1", st2.NewBytes, st2.NewObjects)
	}
	for _, tc := range []struct {
		m     *Manifest
		plain []byte
	}{{m1, l1}, {m2, l2}} {
		got, err := s.Get(ctx, tc.m.DiffID)
		must(t, err)
		var out bytes.Buffer
		must(t, Export(ctx, c, got, &out))
		if !bytes.Equal(out.Bytes(), tc.plain) {
			t.Fatal("export from store differs")
		}
	}
	ids, err := s.List(ctx)
	must(t, err)
	if len(ids) != 2 || !s.Has(m1.DiffID) {
		t.Fatalf("list %v", ids)
	}

	// Collect: nothing goes while both layers are stored.
	if n, _, err := s.Collect(ctx, 0); err != nil || n != 0 {
		t.Fatalf("collect removed %d (%v)", n, err)
	}
	must(t, s.Delete(ctx, m1.DiffID))
	if _, err := s.Get(ctx, m1.DiffID); !errors.Is(err, ErrNotFound) {
		t.Fatalf("get deleted: %v", err)
	}
	n, _, err := s.Collect(ctx, 0)
	must(t, err)
	if n != 2 { // "only in layer one" and the empty object; shared.bin stays
		t.Fatalf("collect removed %d objects, want 2", n)
	}
	if !c.Has(digest.SHA256.FromBytes(shared)) {
		t.Fatal("collect removed an object layer 2 references")
	}
	var out bytes.Buffer
	must(t, Export(ctx, c, m2, &out))

	// A damaged object is detected on export.
	obj := c.Path(digest.SHA256.FromBytes(shared))
	must(t, os.Chmod(obj, 0o644))
	f, err := os.OpenFile(obj, os.O_WRONLY, 0)
	must(t, err)
	f.WriteAt([]byte("X"), 100)
	f.Close()
	err = Export(ctx, c, m2, &bytes.Buffer{})
	if !errors.Is(err, cas.ErrDigestMismatch) {
		t.Fatalf("export of damaged object: %v", err)
	}

	// A damaged manifest is refused.
	p := filepath.Join(root, "manifests", "sha256", m2.DiffID.Encoded())
	b, _ := os.ReadFile(p)
	b[len(b)/2] ^= 1
	must(t, os.WriteFile(p, b, 0o600))
	if _, err := s.Get(ctx, m2.DiffID); !errors.Is(err, ErrCorruptManifest) {
		t.Fatalf("get of damaged manifest: %v", err)
	}
	// And Collect then keeps everything rather than guess.
	if n, _, err := s.Collect(ctx, 0); err == nil || n != 0 {
		t.Fatalf("collect with a bad manifest: %d, %v", n, err)
	}
}

// TestCollectWaitsForImport: a Collect that starts while an import holds
// its lease must see the import's manifest.
func TestCollectWaitsForImport(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, s, err := OpenRoot(t.TempDir())
	must(t, err)
	defer c.Close()
	pr, pw := ioPipe()
	done := make(chan error, 1)
	go func() {
		_, err := s.Import(ctx, pr, IngestOptions{})
		done <- err
	}()
	layer := mkTar(t, file("f", string(pseudoRandom(5, 100000))))
	pw.Write(layer[:70000]) // the first object is on its way
	time.Sleep(100 * time.Millisecond)
	collected := make(chan int, 1)
	go func() {
		n, _, _ := s.Collect(ctx, 0)
		collected <- n
	}()
	time.Sleep(100 * time.Millisecond)
	pw.Write(layer[70000:])
	pw.Close()
	must(t, <-done)
	if n := <-collected; n != 0 {
		t.Fatalf("collect removed %d objects of an in-flight import", n)
	}
	m, err := s.Get(ctx, digest.SHA256.FromBytes(layer))
	must(t, err)
	must(t, Export(ctx, c, m, &bytes.Buffer{}))
}
