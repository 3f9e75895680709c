package cas

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func openStore(t testing.TB, opts Options) *Store {
	t.Helper()
	s, err := Open(t.TempDir(), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func randBytes(seed uint64, n int) []byte {
	b := make([]byte, n)
	rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8), byte(seed >> 16)}).Read(b)
	return b
}

func dgst(b []byte) digest.Digest { return digest.FromBytes(b) }

func readAll(t testing.TB, s *Store, d digest.Digest) []byte {
	t.Helper()
	rc, err := s.Open(d)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func tmpNames(t testing.TB, s *Store) []string {
	t.Helper()
	names, err := readDirNames(filepath.Join(s.Root(), tmpDirName))
	if err != nil {
		t.Fatal(err)
	}
	return names
}

var sizes = []int{0, 1, 4095, 64 << 10, chunkSize - 1, chunkSize, chunkSize + 1, 3*chunkSize + 17}

func TestPutGetRoundTrip(t *testing.T) {
	for _, compress := range []bool{false, true} {
		s := openStore(t, Options{Compress: compress})
		ctx := testCtx(t)
		for i, n := range sizes {
			data := randBytes(uint64(i), n)
			if compress && i%2 == 0 {
				data = bytes.Repeat([]byte("compressible "), n/13+1)[:n]
			}
			d, size, err := s.Put(ctx, bytes.NewReader(data))
			if err != nil {
				t.Fatal(err)
			}
			if d != dgst(data) || size != int64(n) {
				t.Fatalf("size %d: got %s/%d want %s/%d", n, d, size, dgst(data), n)
			}
			if got := readAll(t, s, d); !bytes.Equal(got, data) {
				t.Fatalf("size %d: content differs", n)
			}
			in, err := s.Stat(d)
			if err != nil {
				t.Fatal(err)
			}
			if in.Size != int64(n) || in.Compressed != compress || in.Digest != d {
				t.Fatalf("stat %+v, want size %d compressed %v", in, n, compress)
			}
			st, err := os.Stat(s.Path(d))
			if err != nil {
				t.Fatal(err)
			}
			if st.Mode().Perm() != 0o444 || !st.Mode().IsRegular() {
				t.Fatalf("object mode %v, want -r--r--r--", st.Mode())
			}
			if in.Stored != st.Size() {
				t.Fatalf("stored %d, file %d", in.Stored, st.Size())
			}
			f, err := s.OpenFile(d)
			if compress {
				if err == nil {
					f.Close()
					t.Fatal("OpenFile of a compressed object succeeded")
				}
			} else {
				if err != nil {
					t.Fatal(err)
				}
				if _, err := f.Write([]byte("x")); err == nil {
					t.Fatal("object file is writable")
				}
				f.Close()
			}
		}
		if compress {
			// A compressible object really is stored smaller.
			data := bytes.Repeat([]byte("a"), 1<<20)
			d, _, err := s.Put(ctx, bytes.NewReader(data))
			if err != nil {
				t.Fatal(err)
			}
			in, _ := s.Stat(d)
			if in.Stored >= in.Size/10 || in.Size != 1<<20 {
				t.Fatalf("compressed stat %+v", in)
			}
		}
		if n := len(tmpNames(t, s)); n != 0 {
			t.Fatalf("%d temp files left", n)
		}
	}
}

func TestMissingAndInvalid(t *testing.T) {
	s := openStore(t, Options{})
	d := dgst([]byte("nope"))
	if s.Has(d) {
		t.Fatal("Has on empty store")
	}
	if _, err := s.Stat(d); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Stat: %v", err)
	}
	if _, err := s.Open(d); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Open: %v", err)
	}
	if err := s.Delete(d); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Delete: %v", err)
	}
	if _, err := s.Open("sha256:../../etc/passwd"); err == nil || errors.Is(err, ErrNotFound) {
		t.Fatalf("Open of invalid digest: %v", err)
	}
	if p := s.Path("md5:abc"); p != "" {
		t.Fatalf("Path of invalid digest: %q", p)
	}
}

func TestDedupWritesNothing(t *testing.T) {
	s := openStore(t, Options{})
	ctx := testCtx(t)
	for _, n := range []int{10, 200 << 10} {
		data := randBytes(uint64(n), n)
		d, _, err := s.Put(ctx, bytes.NewReader(data))
		if err != nil {
			t.Fatal(err)
		}
		var before, tmpBefore, after, tmpAfter unix.Stat_t
		unix.Stat(s.Path(d), &before)
		unix.Stat(filepath.Join(s.Root(), tmpDirName), &tmpBefore)
		created := s.tempsCreated.Load()
		time.Sleep(20 * time.Millisecond) // coarse timestamps would hide a rewrite
		d2, n2, err := s.Put(ctx, bytes.NewReader(data))
		if err != nil || d2 != d || n2 != int64(n) {
			t.Fatalf("second put: %s %d %v", d2, n2, err)
		}
		if _, err := s.PutExpected(ctx, d, bytes.NewReader(data)); err != nil {
			t.Fatal(err)
		}
		b := s.NewBatch()
		if _, _, err := b.Put(ctx, bytes.NewReader(data)); err != nil {
			t.Fatal(err)
		}
		if err := b.Commit(ctx); err != nil {
			t.Fatal(err)
		}
		unix.Stat(s.Path(d), &after)
		unix.Stat(filepath.Join(s.Root(), tmpDirName), &tmpAfter)
		if before.Ino != after.Ino || before.Mtim != after.Mtim || before.Ctim != after.Ctim {
			t.Fatalf("object rewritten: %+v -> %+v", before, after)
		}
		// A temp file created and removed would have changed tmp's mtime.
		if tmpBefore.Mtim != tmpAfter.Mtim || s.tempsCreated.Load() != created {
			t.Fatal("a dedup put created a temp file")
		}
	}
}

// tempModes are the temp-file strategies of temp.go: O_TMPFILE, named
// temps, and a mix (the O_TMPFILE cap reached mid-batch).
var tempModes = []struct {
	name string
	set  func(*Store)
}{
	{"tmpfile", func(*Store) {}},
	{"named", func(s *Store) { s.noTmpfile.Store(true) }},
	{"mixed", func(s *Store) { s.maxAnon = 3 }},
}

func TestBatchDedupAndVisibility(t *testing.T) {
	for _, m := range tempModes {
		t.Run(m.name, func(t *testing.T) {
			s := openStore(t, Options{})
			m.set(s)
			testBatch(t, s)
			if n := s.anonOpen.Load(); n != 0 {
				t.Fatalf("%d O_TMPFILE descriptors still open", n)
			}
		})
	}
}

func testBatch(t *testing.T, s *Store) {
	ctx := testCtx(t)
	b := s.NewBatch()
	var ds []digest.Digest
	for i := 0; i < 50; i++ {
		data := randBytes(uint64(i%20), 1000+i%20*3000) // 20 distinct
		if i == 7 {
			data = randBytes(99, 2*chunkSize+5)
		}
		d, _, err := b.Put(ctx, bytes.NewReader(data))
		if err != nil {
			t.Fatal(err)
		}
		ds = append(ds, d)
	}
	if s.Has(ds[0]) {
		t.Fatal("object visible before Commit")
	}
	if err := b.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if err := b.Commit(ctx); err == nil {
		t.Fatal("second Commit succeeded")
	}
	n := 0
	s.Walk(ctx, func(in Info) error { n++; return nil })
	if n != 21 {
		t.Fatalf("walk found %d objects, want 21", n)
	}
	for _, d := range ds {
		if !s.Has(d) {
			t.Fatalf("%s missing after commit", d)
		}
	}
	if len(tmpNames(t, s)) != 0 {
		t.Fatal("temp files left")
	}

	// Abort keeps nothing.
	b = s.NewBatch()
	d, _, err := b.Put(ctx, bytes.NewReader([]byte("aborted")))
	if err != nil {
		t.Fatal(err)
	}
	d2, _, err := b.Put(ctx, bytes.NewReader(randBytes(5, 3*chunkSize)))
	if err != nil {
		t.Fatal(err)
	}
	b.Abort()
	if s.Has(d) || s.Has(d2) || len(tmpNames(t, s)) != 0 {
		t.Fatal("Abort left something behind")
	}
}

func TestConcurrentSameContent(t *testing.T) {
	for i, n := range []int{100 << 10, 3*chunkSize + 1, 5000} {
		s := openStore(t, Options{})
		tempModes[i].set(s)
		ctx := testCtx(t)
		data := randBytes(7, n)
		var wg sync.WaitGroup
		errs := make(chan error, 32)
		for g := 0; g < 32; g++ {
			wg.Go(func() {
				var d digest.Digest
				var err error
				if g%2 == 0 {
					d, _, err = s.Put(ctx, bytes.NewReader(data))
				} else {
					b := s.NewBatch()
					if d, _, err = b.Put(ctx, bytes.NewReader(data)); err == nil {
						err = b.Commit(ctx)
					}
				}
				if err == nil && d != dgst(data) {
					err = errors.New("wrong digest")
				}
				errs <- err
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Fatal(err)
			}
		}
		d := dgst(data)
		entries, _ := os.ReadDir(filepath.Dir(s.Path(d)))
		if len(entries) != 1 {
			t.Fatalf("%d files in shard, want 1", len(entries))
		}
		if !bytes.Equal(readAll(t, s, d), data) {
			t.Fatal("content differs")
		}
		if len(tmpNames(t, s)) != 0 {
			t.Fatal("temp files left")
		}
	}
}

func TestPutExpectedMismatch(t *testing.T) {
	for _, compress := range []bool{false, true} {
		s := openStore(t, Options{Compress: compress})
		ctx := testCtx(t)
		for _, n := range []int{5, 2*chunkSize + 3} {
			data := randBytes(3, n)
			wrong := dgst([]byte("something else"))
			if _, err := s.PutExpected(ctx, wrong, bytes.NewReader(data)); !errors.Is(err, ErrDigestMismatch) {
				t.Fatalf("got %v, want ErrDigestMismatch", err)
			}
			b := s.NewBatch()
			if _, err := b.PutExpected(ctx, wrong, bytes.NewReader(data)); !errors.Is(err, ErrDigestMismatch) {
				t.Fatalf("batch: got %v", err)
			}
			if err := b.Commit(ctx); err != nil {
				t.Fatal(err)
			}
			if s.Has(dgst(data)) || s.Has(wrong) {
				t.Fatal("mismatched content kept")
			}
			if len(tmpNames(t, s)) != 0 {
				t.Fatal("temp files left")
			}
			// Right digest works; and re-putting it when present verifies.
			if got, err := s.PutExpected(ctx, dgst(data), bytes.NewReader(data)); err != nil || got != int64(n) {
				t.Fatal(got, err)
			}
			bad := append([]byte{}, data...)
			bad[0] ^= 1
			if _, err := s.PutExpected(ctx, dgst(data), bytes.NewReader(bad)); !errors.Is(err, ErrDigestMismatch) {
				t.Fatalf("present object, wrong content: %v", err)
			}
		}
	}
}

func TestFsckCorruptAndRepair(t *testing.T) {
	for _, compress := range []bool{false, true} {
		s := openStore(t, Options{Compress: compress})
		ctx := testCtx(t)
		var ds []digest.Digest
		for i := 0; i < 10; i++ {
			d, _, err := s.Put(ctx, bytes.NewReader(randBytes(uint64(i), 5000*i+1)))
			if err != nil {
				t.Fatal(err)
			}
			ds = append(ds, d)
		}
		rep, err := s.Fsck(ctx, false)
		if err != nil || rep.Objects != 10 || len(rep.Corrupt) != 0 || rep.TempFiles != 0 {
			t.Fatalf("clean fsck: %+v %v", rep, err)
		}
		// Flip a byte as root (the 0444 mode does not stop root).
		victim := ds[4]
		f, err := os.OpenFile(s.Path(victim), os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		var b [1]byte
		off := int64(100)
		f.ReadAt(b[:], off)
		b[0] ^= 0x40
		f.WriteAt(b[:], off)
		f.Close()
		os.WriteFile(filepath.Join(s.Root(), tmpDirName, "stale"), []byte("x"), 0o600)

		rep, err = s.Fsck(ctx, false)
		if err != nil || len(rep.Corrupt) != 1 || rep.Corrupt[0] != victim || rep.TempFiles != 1 || rep.Repaired {
			t.Fatalf("fsck: %+v %v", rep, err)
		}
		if !s.Has(victim) {
			t.Fatal("fsck without repair removed an object")
		}
		rep, err = s.Fsck(ctx, true)
		if err != nil || len(rep.Corrupt) != 1 || !rep.Repaired {
			t.Fatalf("fsck repair: %+v %v", rep, err)
		}
		if s.Has(victim) || len(tmpNames(t, s)) != 0 {
			t.Fatal("repair left the corrupt object or the temp")
		}
		rep, err = s.Fsck(ctx, false)
		if err != nil || rep.Objects != 9 || len(rep.Corrupt) != 0 || rep.TempFiles != 0 {
			t.Fatalf("after repair: %+v %v", rep, err)
		}
	}
}

func TestOpenSweepsStaleTemps(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx := testCtx(t)
	stale := filepath.Join(dir, tmpDirName, "crashed")
	os.WriteFile(stale, []byte("partial"), 0o444)
	release, err := s.Lease(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// A lease holder is alive: its temps must survive another Open.
	s2, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	s2.Close()
	if _, err := os.Stat(stale); err != nil {
		t.Fatal("temp swept while a lease was held")
	}
	release()
	s.Close()
	s3, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	s3.Close()
	if _, err := os.Stat(stale); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("stale temp not swept at Open")
	}
}

type failingReader struct {
	r   io.Reader
	n   int // bytes before the error
	err error
}

func (f *failingReader) Read(p []byte) (int, error) {
	if f.n <= 0 {
		return 0, f.err
	}
	if len(p) > f.n {
		p = p[:f.n]
	}
	n, err := f.r.Read(p)
	f.n -= n
	return n, err
}

// A reader failing mid-put (small or streamed) fails that put only; the
// batch commits the rest and leaves no temp or descriptor behind.
func TestPutReaderError(t *testing.T) {
	for _, m := range tempModes {
		t.Run(m.name, func(t *testing.T) {
			s := openStore(t, Options{})
			m.set(s)
			ctx := testCtx(t)
			boom := errors.New("boom")
			b := s.NewBatch()
			good, _, err := b.Put(ctx, bytes.NewReader([]byte("good")))
			if err != nil {
				t.Fatal(err)
			}
			for _, n := range []int{10, 2*chunkSize + 10} {
				data := randBytes(uint64(n), 3*chunkSize)
				if _, _, err := b.Put(ctx, &failingReader{bytes.NewReader(data), n, boom}); !errors.Is(err, boom) {
					t.Fatalf("put with failing reader: %v", err)
				}
				if _, _, err := s.Put(ctx, &failingReader{bytes.NewReader(data), n, boom}); !errors.Is(err, boom) {
					t.Fatalf("store put with failing reader: %v", err)
				}
			}
			cctx, cancel := context.WithCancel(ctx)
			cancel()
			if _, _, err := b.Put(cctx, bytes.NewReader([]byte("late"))); !errors.Is(err, context.Canceled) {
				t.Fatalf("put with cancelled ctx: %v", err)
			}
			if err := b.Commit(ctx); err != nil {
				t.Fatal(err)
			}
			n := 0
			s.Walk(ctx, func(Info) error { n++; return nil })
			if n != 1 || !s.Has(good) {
				t.Fatalf("%d objects after commit, want only the good one", n)
			}
			if len(tmpNames(t, s)) != 0 || s.anonOpen.Load() != 0 {
				t.Fatalf("left %d temps, %d descriptors", len(tmpNames(t, s)), s.anonOpen.Load())
			}
		})
	}
}

// perFileSync: few objects, or not too many big ones, sync file by file.
func TestPerFileSyncChoice(t *testing.T) {
	objs := func(n int, size int64) []*tempObj {
		out := make([]*tempObj, n)
		for i := range out {
			out[i] = &tempObj{logical: size}
		}
		return out
	}
	for _, c := range []struct {
		n    int
		size int64
		hits int
		want bool
	}{
		{8, 1, 0, true},
		{9, 4 << 10, 0, false},
		{35, 4 << 20, 0, true},
		{64, 1 << 20, 3, true},
		{65, 8 << 20, 0, false},
		{35, 4 << 20, 200, false},
		{40, 64 << 10, 0, false},
	} {
		if got := perFileSync(objs(c.n, c.size), c.hits); got != c.want {
			t.Errorf("%d objects of %d bytes, %d hits: per-file %v, want %v", c.n, c.size, c.hits, got, c.want)
		}
	}
}
