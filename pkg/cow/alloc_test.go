package cow

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"sync"
	"syscall"
	"testing"
)

// patternBase is a read-only base whose byte at off is a function of off.
type patternBase struct{ size int64 }

func (p patternBase) ReadAt(b []byte, off int64) (int, error) {
	n := 0
	for ; n < len(b) && off+int64(n) < p.size; n++ {
		x := off + int64(n)
		b[n] = byte(x*131 + x>>9 + 1)
	}
	if n < len(b) {
		return n, io.EOF
	}
	return n, nil
}

func mustOpen(t testing.TB, opts Options) *Region {
	t.Helper()
	r, err := Open(t.TempDir(), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// Two files written sequentially in interleaved chunks each stay in a few
// long extents, thanks to per-file windows.
func TestLocalityInterleaved(t *testing.T) {
	for _, reserve := range []int64{64 << 20, 4 << 20} {
		testLocalityInterleaved(t, reserve)
	}
}

func testLocalityInterleaved(t *testing.T, reserve int64) {
	r := mustOpen(t, Options{Reserve: reserve})
	a, _ := r.Create(1)
	b, _ := r.Create(2)
	chunk := bytes.Repeat([]byte{7}, 64<<10)
	for off := int64(0); off < 8<<20; off += int64(len(chunk)) {
		for _, f := range []*File{a, b} {
			if _, err := f.WriteAt(chunk, off, nil); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, f := range []*File{a, b} {
		// With room, a few extents; when the region has to grow in small
		// steps under two writers, still long runs (>= 256 KiB).
		if n := len(f.Extents()); (reserve > 16<<20 && n > 8) || n > 32 {
			t.Errorf("reserve %d: file %d: %d extents for 8 MiB written in 64 KiB chunks interleaved with another file", reserve, f.ID(), n)
		}
	}
	st := r.Stats()
	t.Logf("interleaved, reserve %d MiB: %d extents/file, avg extent %.0f KiB", reserve>>20, int(st.ExtentsPerFile), st.AvgExtentBytes/1024)
	if st.Used != 16<<20 {
		t.Errorf("used %d, want 16 MiB", st.Used)
	}
	checkInvariants(t, r)
}

// Random 4 KiB writes into a large base copy only those blocks, placed
// together (the file's window), and read back merged.
func TestCoWRandomWrites(t *testing.T) {
	r := mustOpen(t, Options{Reserve: 8 << 20})
	base := patternBase{256 << 20}
	f, _ := r.Create(1)
	if err := f.SetBase(base.size); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	touched := map[int64]bool{}
	buf := bytes.Repeat([]byte{0xee}, 4096)
	for range 200 {
		off := rng.Int64N(base.size - 8192)
		if _, err := f.WriteAt(buf[:100], off, base); err != nil { // partial: read-modify-write of its block(s)
			t.Fatal(err)
		}
		touched[off/4096] = true
		touched[(off+99)/4096] = true
	}
	st := r.Stats()
	if want := int64(len(touched)) * 4096; st.Used != want {
		t.Fatalf("used %d bytes, want %d (only touched blocks)", st.Used, want)
	}
	lo, hi := int64(1<<62), int64(0)
	for _, e := range f.Extents() {
		lo, hi = min(lo, e.Phys), max(hi, e.Phys+e.Len)
	}
	if hi-lo > st.Used+1<<20 {
		t.Errorf("CoW blocks spread over %d bytes of the region for %d used", hi-lo, st.Used)
	}
	if f.Size() != base.size || !f.Modified() {
		t.Fatalf("size %d modified %v", f.Size(), f.Modified())
	}
	// Spot-check merged reads around a few written blocks.
	got := make([]byte, 3*4096)
	want := make([]byte, len(got))
	for blk := range touched {
		off := max(blk*4096-4096, 0)
		if _, err := f.ReadAt(got, off, base); err != nil {
			t.Fatal(err)
		}
		base.ReadAt(want, off)
		for i := range got {
			if got[i] != want[i] && got[i] != 0xee {
				t.Fatalf("byte at %d is %x: neither base %x nor written", off+int64(i), got[i], want[i])
			}
		}
		break
	}
	t.Logf("200 random 100-byte writes into a 256 MiB base: %d blocks, %d extents", len(touched), len(f.Extents()))
	checkInvariants(t, r)
}

// Freed space is reused after the free is durable, and big freed runs are
// punched out of the data file.
func TestReuseAndPunch(t *testing.T) {
	r := mustOpen(t, Options{Reserve: 8 << 20})
	a, _ := r.Create(1)
	data := bytes.Repeat([]byte{1}, 6<<20)
	if _, err := a.WriteAt(data, 0, nil); err != nil {
		t.Fatal(err)
	}
	if err := r.Sync(); err != nil {
		t.Fatal(err)
	}
	before := r.Stats()
	if err := r.Remove(1); err != nil {
		t.Fatal(err)
	}
	if st := r.Stats(); st.Pending != 6<<20 || st.Used != 0 {
		t.Fatalf("after remove: pending %d used %d", st.Pending, st.Used)
	}
	if err := r.Sync(); err != nil {
		t.Fatal(err)
	}
	after := r.Stats()
	if after.Pending != 0 || after.DiskBytes > before.DiskBytes-5<<20 {
		t.Fatalf("remove+sync: pending %d, disk %d -> %d (not punched)", after.Pending, before.DiskBytes, after.DiskBytes)
	}
	b, _ := r.Create(2)
	if _, err := b.WriteAt(data, 0, nil); err != nil {
		t.Fatal(err)
	}
	if st := r.Stats(); st.Capacity != before.Capacity {
		t.Fatalf("capacity grew %d -> %d: freed space not reused", before.Capacity, st.Capacity)
	}
	// Truncate frees too.
	if err := b.Truncate(1 << 20); err != nil {
		t.Fatal(err)
	}
	if st := r.Stats(); st.Used != 1<<20 || st.Pending != 5<<20 {
		t.Fatalf("after truncate: used %d pending %d", st.Used, st.Pending)
	}
	checkInvariants(t, r)
}

// Writes past the cap fail with ENOSPC; statfs reports the cap; space freed
// by a remove is usable again without an explicit Sync.
func TestQuota(t *testing.T) {
	const capB = 1 << 20
	r := mustOpen(t, Options{Reserve: 256 << 10, GrowStep: 256 << 10, MaxSize: capB})
	f, _ := r.Create(1)
	buf := bytes.Repeat([]byte{9}, 48<<10)
	var off int64
	var err error
	for off < 4*capB {
		var n int
		n, err = f.WriteAt(buf, off, nil)
		off += int64(n)
		if err != nil {
			break
		}
	}
	if !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("write past cap: %v, want ENOSPC", err)
	}
	if off != capB {
		t.Fatalf("wrote %d bytes before ENOSPC, want exactly the cap %d", off, capB)
	}
	st := r.Stats()
	if st.Capacity != capB || st.Used != capB {
		t.Fatalf("stats at cap: %+v", st)
	}
	sf, err := r.Statfs()
	if err != nil || sf.Blocks*uint64(sf.BlockSize) != capB || sf.Free != 0 {
		t.Fatalf("statfs at cap: %+v %v", sf, err)
	}
	// Overwriting blocks already in the region needs no space.
	if _, err := f.WriteAt(buf, 0, nil); err != nil {
		t.Fatalf("overwrite at cap: %v", err)
	}
	// A second file gets ENOSPC too, then succeeds once the first is gone.
	g, _ := r.Create(2)
	if _, err := g.WriteAt(buf, 0, nil); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("second file at cap: %v", err)
	}
	if err := r.Remove(1); err != nil {
		t.Fatal(err)
	}
	if _, err := g.WriteAt(buf, 0, nil); err != nil {
		t.Fatalf("write after remove at cap: %v", err)
	}
	checkInvariants(t, r)
}

// Concurrent writers, readers and syncs on several files.
func TestConcurrent(t *testing.T) {
	r := mustOpen(t, Options{Reserve: 1 << 20, GrowStep: 1 << 20})
	base := patternBase{1 << 20}
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for w := range 4 {
		f, _ := r.Create(uint64(w + 1))
		if w%2 == 0 {
			f.SetBase(base.size)
		}
		wg.Add(2)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 9))
			buf := bytes.Repeat([]byte{byte(w + 1)}, 6000)
			for range 300 {
				if _, err := f.WriteAt(buf[:rng.IntN(6000)+1], rng.Int64N(1<<20), base); err != nil {
					errs <- err
					return
				}
				if rng.IntN(50) == 0 {
					if err := f.Truncate(rng.Int64N(1 << 20)); err != nil {
						errs <- err
						return
					}
				}
			}
		}()
		go func() {
			defer wg.Done()
			buf := make([]byte, 8192)
			for i := range 300 {
				if _, err := f.ReadAt(buf, int64(i*3000), base); err != nil && !errors.Is(err, io.EOF) {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for range 20 {
			if err := r.Sync(); err != nil {
				errs <- err
				return
			}
		}
	}()
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	checkInvariants(t, r)
	// Every byte of file w is from the base, zero, or w+1.
	for w := range 4 {
		f, _ := r.File(uint64(w + 1))
		got := readAll(t, f, nil2base(w, base))
		want := make([]byte, len(got))
		base.ReadAt(want, 0)
		for i, c := range got {
			if c != byte(w+1) && c != 0 && c != want[i] {
				t.Fatalf("file %d byte %d = %x: foreign data", w+1, i, c)
			}
		}
	}
}

func nil2base(w int, b patternBase) []byte {
	out := make([]byte, b.size)
	b.ReadAt(out, 0)
	return out
}

// Many small files, each created, written and closed (TrimReserve) in
// turn, as an unpack or a build does: they are packed back to back and
// the data file stays about the size of their data, instead of growing by
// a placement window per file.
func TestSmallFilesPacked(t *testing.T) {
	r := mustOpen(t, Options{Reserve: 256 << 10, GrowStep: 16 << 20})
	buf := bytes.Repeat([]byte{3}, 4096)
	const n = 2000
	for id := uint64(1); id <= n; id++ {
		f, err := r.Create(id)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteAt(buf, 0, nil); err != nil {
			t.Fatal(err)
		}
		f.TrimReserve()
	}
	st := r.Stats()
	if st.Used != n*4096 {
		t.Fatalf("used %d, want %d", st.Used, n*4096)
	}
	// 8 MiB of data: the reserve plus the grow steps that held it and
	// one grown ahead at most (a window per file took over 1 GiB).
	if st.Capacity > 33<<20 {
		t.Errorf("data file is %d MiB for %d 4 KiB files", st.Capacity>>20, n)
	}
	prev := int64(-1)
	for id := uint64(1); id <= n; id++ {
		f, _ := r.File(id)
		e := f.Extents()
		if len(e) != 1 {
			t.Fatalf("file %d: %d extents", id, len(e))
		}
		if prev >= 0 && e[0].Phys != prev+4096 {
			t.Fatalf("file %d at %d, previous file at %d: not packed", id, e[0].Phys, prev)
		}
		prev = e[0].Phys
	}
	checkInvariants(t, r)
	t.Logf("%d small files: data file %d MiB, %d MiB on disk", n, st.Capacity>>20, st.DiskBytes>>20)
}

// A region written in earnest grows ahead in the background: a
// sequential writer does not wait for an fallocate in its own write
// (other than the first grow past the reserve), the data reads back,
// and the data file stays within a grow ahead of what is used.
func TestGrowAhead(t *testing.T) {
	r := mustOpen(t, Options{Reserve: 256 << 10, GrowStep: 1 << 20})
	f, _ := r.Create(1)
	chunk := make([]byte, 128<<10)
	const total = 32 << 20
	for off := int64(0); off < total; off += int64(len(chunk)) {
		for i := range chunk {
			chunk[i] = byte(off>>17) + byte(i)
		}
		if _, err := f.WriteAt(chunk, off, nil); err != nil {
			t.Fatal(err)
		}
	}
	r.mu.Lock()
	for r.growing {
		r.growDone.Wait()
	}
	inline, ahead := r.inlineGrows, r.aheadGrows
	r.mu.Unlock()
	st := r.Stats()
	t.Logf("32 MiB written: %d grows in the write path, %d ahead; data file %d MiB", inline, ahead, st.Capacity>>20)
	if ahead == 0 || inline > 2 {
		t.Errorf("%d grows in the write path, %d ahead: want (nearly) all ahead", inline, ahead)
	}
	if st.Capacity > st.Used+maxAheadSteps<<20+256<<10 {
		t.Errorf("data file %d bytes for %d used", st.Capacity, st.Used)
	}
	got := make([]byte, len(chunk))
	for off := int64(0); off < total; off += int64(len(chunk)) {
		if _, err := f.ReadAt(got, off, nil); err != nil {
			t.Fatal(err)
		}
		if got[1] != byte(off>>17)+1 {
			t.Fatalf("at %d: read %d", off, got[1])
		}
	}
	if n := len(f.Extents()); n > 4 {
		t.Errorf("%d extents for one sequential file", n)
	}
	checkInvariants(t, r)
	// A region that changes a few blocks never grows past its reserve.
	small := mustOpen(t, Options{Reserve: 256 << 10, GrowStep: 16 << 20})
	g, _ := small.Create(1)
	if _, err := g.WriteAt(make([]byte, 4096), 1<<20, nil); err != nil {
		t.Fatal(err)
	}
	if err := small.Close(); err != nil {
		t.Fatal(err)
	}
	if c := small.Stats().Capacity; c != 256<<10 {
		t.Errorf("a 4 KiB write grew the region to %d bytes", c)
	}
}
