package cow

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// TestDifferential runs seeded random operations on region files and on
// plain files of the host filesystem (starting as copies of a random base)
// and compares them after every step and after reopening the region.
func TestDifferential(t *testing.T) {
	seeds := 12
	if testing.Short() {
		seeds = 4
	}
	for _, bs := range []int{512, 4096} {
		for seed := range seeds {
			runDifferential(t, uint64(seed), bs, 250)
		}
	}
}

type diffFile struct {
	base  []byte
	plain *os.File
	f     *File
}

func runDifferential(t *testing.T, seed uint64, bs, ops int) {
	rng := rand.New(rand.NewPCG(seed, uint64(bs)))
	dir := t.TempDir()
	opts := Options{BlockSize: bs, Reserve: int64(16 * bs), GrowStep: int64(16 * bs),
		FileReserve: int64(4 * bs), PunchThreshold: int64(8 * bs), JournalLimit: 16 << 10}
	r, err := Open(filepath.Join(dir, "region"), opts)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { r.Close() }()
	files := map[uint64]*diffFile{}
	defer func() {
		for _, d := range files {
			d.plain.Close()
		}
	}()
	maxLen := 10 * bs
	randData := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rng.Uint32()) | 1 // never zero: holes must not match by accident
		}
		return b
	}
	fail := func(step int, op string, err error) {
		t.Helper()
		t.Fatalf("seed %d bs %d step %d %s: %v", seed, bs, step, op, err)
	}
	compare := func(step int, op string, id uint64) {
		t.Helper()
		d := files[id]
		want, err := io.ReadAll(io.NewSectionReader(d.plain, 0, 1<<40))
		if err != nil {
			fail(step, op, err)
		}
		got := readAll(t, d.f, d.base)
		if !bytes.Equal(got, want) {
			fail(step, op, errorf("file %d: size %d want %d, first diff at %d", id, len(got), len(want), firstDiff(got, want)))
		}
	}
	for step := range ops {
		id := uint64(rng.IntN(4) + 1)
		d := files[id]
		if d == nil {
			d = &diffFile{}
			f, err := r.Create(id)
			if err != nil {
				fail(step, "create", err)
			}
			d.f = f
			if rng.IntN(3) > 0 {
				d.base = randData(rng.IntN(maxLen))
				if err := f.SetBase(int64(len(d.base))); err != nil {
					fail(step, "setbase", err)
				}
			}
			p, err := os.Create(filepath.Join(dir, "plain-"+string(rune('a'+id))))
			if err != nil {
				fail(step, "create plain", err)
			}
			p.Write(d.base)
			d.plain = p
			files[id] = d
		}
		size := d.f.Size()
		base := bytes.NewReader(d.base)
		var op string
		switch k := rng.IntN(20); {
		case k < 9: // write, often unaligned, sometimes past the end
			op = "write"
			off := rng.Int64N(size + int64(2*bs) + 1)
			if rng.IntN(4) == 0 {
				off = off / int64(bs) * int64(bs)
			}
			n := rng.IntN(3*bs) + 1
			if rng.IntN(8) == 0 {
				n = rng.IntN(maxLen) + 1
			}
			buf := randData(n)
			if _, err := d.f.WriteAt(buf, off, base); err != nil {
				fail(step, op, err)
			}
			if _, err := d.plain.WriteAt(buf, off); err != nil {
				fail(step, op, err)
			}
		case k < 10: // append
			op = "append"
			buf := randData(rng.IntN(2*bs) + 1)
			if _, at, err := d.f.Append(buf, base); err != nil || at != size {
				fail(step, op, errorf("at %d (size %d): %v", at, size, err))
			}
			d.plain.WriteAt(buf, size)
		case k < 13:
			op = "truncate"
			ns := rng.Int64N(size*3/2 + int64(bs) + 1)
			if rng.IntN(3) == 0 {
				ns = ns / int64(bs) * int64(bs)
			}
			if err := d.f.Truncate(ns); err != nil {
				fail(step, op, err)
			}
			d.plain.Truncate(ns)
		case k < 15:
			modes := []uint32{0, unix.FALLOC_FL_KEEP_SIZE, unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE,
				unix.FALLOC_FL_ZERO_RANGE, unix.FALLOC_FL_ZERO_RANGE | unix.FALLOC_FL_KEEP_SIZE}
			mode := modes[rng.IntN(len(modes))]
			op = "fallocate"
			off := rng.Int64N(size + int64(bs) + 1)
			n := rng.Int64N(int64(3*bs)) + 1
			if err := d.f.Fallocate(mode, off, n, base); err != nil {
				fail(step, op, err)
			}
			if err := unix.Fallocate(int(d.plain.Fd()), mode, off, n); err != nil {
				fail(step, op+" plain", err)
			}
		case k < 16:
			op = "read"
			off := rng.Int64N(size + 2)
			buf := make([]byte, rng.IntN(3*bs)+1)
			want := make([]byte, len(buf))
			n, err := d.f.ReadAt(buf, off, base)
			wn, werr := d.plain.ReadAt(want, off)
			if n != wn || (err == nil) != (werr == nil) || !bytes.Equal(buf[:n], want[:wn]) {
				fail(step, op, errorf("at %d: n=%d err=%v, plain n=%d err=%v", off, n, err, wn, werr))
			}
		case k < 17:
			op = "remove"
			if err := r.Remove(id); err != nil {
				fail(step, op, err)
			}
			if _, err := d.f.ReadAt(make([]byte, 1), 0, base); !errors.Is(err, ErrRemoved) {
				fail(step, op, errorf("read after remove: %v", err))
			}
			d.plain.Close()
			delete(files, id)
		case k < 18:
			op = "sync"
			if err := r.Sync(); err != nil {
				fail(step, op, err)
			}
		default:
			op = "reopen"
			if rng.IntN(2) == 0 {
				if err := r.Sync(); err != nil {
					fail(step, op, err)
				}
			}
			if err := r.Close(); err != nil {
				fail(step, op, err)
			}
			if r, err = Open(filepath.Join(dir, "region"), opts); err != nil {
				fail(step, op, err)
			}
			for fid, fd := range files {
				if fd.f, err = r.File(fid); err != nil {
					fail(step, op, err)
				}
			}
			if got, want := len(r.Files()), len(files); got != want {
				fail(step, op, errorf("%d files after reopen, want %d", got, want))
			}
		}
		if files[id] != nil {
			compare(step, op, id)
		}
		checkInvariants(t, r)
	}
	for id := range files {
		compare(ops, "final", id)
	}
}
