package cow

import (
	"errors"
	"fmt"
	"io"
	"math"
	"sync"
	"syscall"
)

// File is one file of the region: its blocks in the region laid over an
// optional read-only base (the image file's CAS object). Safe for
// concurrent use.
type File struct {
	r  *Region
	id uint64

	mu       sync.RWMutex
	size     int64
	baseSize int64
	// baseLen is how much of the base is still visible: a shrink hides the
	// base beyond it for good, so a later extend reads zeros.
	baseLen int64
	hasBase bool
	m       extMap
	hint    uint64 // physical block after the last allocation (placement goal)
	removed bool

	resv run // placement window; guarded by r.mu
}

func newFile(r *Region, id uint64) *File { return &File{r: r, id: id, hint: noGoal} }

// Extent is a run of the file stored in the region (byte units).
type Extent struct {
	Off  int64 // offset in the file
	Phys int64 // offset in the region's data file
	Len  int64
}

// ID is the caller's identifier of the file.
func (f *File) ID() uint64 { return f.id }

// Size is the file's current length.
func (f *File) Size() int64 {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.size
}

// BaseSize is the size recorded by SetBase (0 without a base); HasBase
// reports whether SetBase was called.
func (f *File) BaseSize() int64 {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.baseSize
}

func (f *File) HasBase() bool {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.hasBase
}

// Modified reports whether the content may differ from the base: always
// true for a file without base (it is new content).
func (f *File) Modified() bool {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return !f.hasBase || len(f.m.e) > 0 || f.size != f.baseSize || f.baseLen != f.baseSize
}

// Extents lists the region runs of the file, in file order.
func (f *File) Extents() []Extent {
	f.mu.RLock()
	defer f.mu.RUnlock()
	bs := int64(f.r.bs)
	out := make([]Extent, len(f.m.e))
	for i, e := range f.m.e {
		out[i] = Extent{Off: int64(e.L) * bs, Phys: int64(e.P) * bs, Len: int64(e.N) * bs}
	}
	return out
}

// Sync is Region.Sync: the region has one journal, so syncing one file
// syncs all (like syncfs; cheap when nothing else is dirty).
func (f *File) Sync() error { return f.r.Sync() }

func (f *File) attrRecord() record {
	var fl uint64
	if f.hasBase {
		fl |= attrHasBase
	}
	return record{T: recAttr, ID: f.id, A: uint64(f.size), B: uint64(f.baseSize), C: uint64(f.baseLen), D: fl}
}

// lock takes the locks of a mutating operation: writers share syncMu so a
// Sync never commits a record whose data write is still in flight.
func (f *File) lock() error {
	f.r.syncMu.RLock()
	f.mu.Lock()
	if f.removed {
		f.unlock()
		return ErrRemoved
	}
	f.r.mu.Lock()
	err := f.r.usable()
	f.r.mu.Unlock()
	if err != nil {
		f.unlock()
	}
	return err
}

func (f *File) unlock() {
	f.mu.Unlock()
	f.r.syncMu.RUnlock()
}

func (f *File) markAttr() {
	f.r.mu.Lock()
	f.r.attrs[f.id] = struct{}{}
	f.r.mu.Unlock()
}

// SetBase declares that the file starts as a copy of a read-only base of
// baseSize bytes (the CAS object, passed to ReadAt/WriteAt). Only for a
// file that has no content yet.
func (f *File) SetBase(baseSize int64) error {
	if baseSize < 0 {
		return fmt.Errorf("cow: set base of %d: size %d: %w", f.id, baseSize, syscall.EINVAL)
	}
	if err := f.lock(); err != nil {
		return fmt.Errorf("cow: set base of %d: %w", f.id, err)
	}
	defer f.unlock()
	if f.hasBase || f.size != 0 || len(f.m.e) > 0 {
		return fmt.Errorf("cow: set base of %d: file already has content: %w", f.id, syscall.EINVAL)
	}
	f.hasBase, f.baseSize, f.baseLen, f.size = true, baseSize, baseSize, baseSize
	f.markAttr()
	return nil
}

// ReadAt reads the merged content: region blocks over base blocks, zeros in
// holes and past the visible base. Like os.File, it returns io.EOF when
// fewer than len(p) bytes are available.
func (f *File) ReadAt(p []byte, off int64, base io.ReaderAt) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("cow: read %d at %d: %w", f.id, off, syscall.EINVAL)
	}
	f.mu.RLock()
	defer f.mu.RUnlock()
	if f.removed {
		return 0, ErrRemoved
	}
	if off >= f.size {
		return 0, io.EOF
	}
	n := min(int64(len(p)), f.size-off)
	bs := int64(f.r.bs)
	for pos, end := off, off+n; pos < end; {
		in := pos % bs
		pp, run, mapped := f.m.lookup(uint64(pos / bs))
		span := end - pos
		if run < uint64(span/bs+2) {
			span = min(span, int64(run)*bs-in)
		}
		dst := p[pos-off : pos-off+span]
		if mapped {
			if _, err := f.r.data.ReadAt(dst, int64(pp)*bs+in); err != nil {
				return int(pos - off), fmt.Errorf("cow: read %d at %d: region: %w", f.id, pos, err)
			}
		} else if err := f.readBase(dst, pos, base); err != nil {
			return int(pos - off), err
		}
		pos += span
	}
	if n < int64(len(p)) {
		return int(n), io.EOF
	}
	return int(n), nil
}

// readBase fills dst with what an unmapped range at pos holds: the visible
// base, zeros beyond it.
func (f *File) readBase(dst []byte, pos int64, base io.ReaderAt) error {
	k := int64(0)
	if pos < f.baseLen {
		k = min(int64(len(dst)), f.baseLen-pos)
		if base == nil {
			return fmt.Errorf("cow: file %d needs its base reader at %d: %w", f.id, pos, syscall.EINVAL)
		}
		for got := int64(0); got < k; {
			n, err := base.ReadAt(dst[got:k], pos+got)
			got += int64(n)
			if got < k && err != nil {
				if errors.Is(err, io.EOF) {
					err = io.ErrUnexpectedEOF
				}
				return fmt.Errorf("cow: read base of %d at %d: %w", f.id, pos+got, err)
			}
		}
	}
	clear(dst[k:])
	return nil
}

// WriteAt writes p at off. Only the blocks touched are copied into the
// region; a partial block not yet in the region is completed from the base
// (or zeros) first. Writing past the end extends the file (the gap reads as
// zeros). Past the region's cap it fails with an error wrapping ENOSPC.
func (f *File) WriteAt(p []byte, off int64, base io.ReaderAt) (int, error) {
	if off < 0 || off > math.MaxInt64-int64(len(p)) {
		return 0, fmt.Errorf("cow: write %d at %d: %w", f.id, off, syscall.EINVAL)
	}
	n, _, err := f.write(p, off, base)
	return n, err
}

// Append writes p at the end of the file atomically with respect to other
// writers of this File (O_APPEND) and returns the offset it wrote at.
func (f *File) Append(p []byte, base io.ReaderAt) (int, int64, error) {
	return f.write(p, -1, base)
}

// write is WriteAt, or an append when off < 0.
func (f *File) write(p []byte, off int64, base io.ReaderAt) (int, int64, error) {
	done, retried := 0, false
	for done < len(p) {
		at := off
		if off >= 0 {
			at = off + int64(done)
		}
		n, start, err := f.writeOnce(p[done:], at, base)
		if off < 0 {
			off = start // later chunks continue where the append began
			at = start
		}
		done += n
		if n > 0 {
			retried = false
		}
		if errors.Is(err, errNeedCommit) && !retried {
			// Space freed by removes/truncates becomes usable once durable.
			retried = true
			if err := f.r.Sync(); err != nil {
				return done, off, err
			}
			continue
		}
		if errors.Is(err, errNeedCommit) {
			err = ErrNoSpace
		}
		if err != nil {
			return done, off, fmt.Errorf("cow: write %d at %d: %w", f.id, at, err)
		}
	}
	return done, off, f.r.maybeCommit()
}

func (f *File) writeOnce(p []byte, off int64, base io.ReaderAt) (written int, start int64, err error) {
	if err := f.lock(); err != nil {
		return 0, off, err
	}
	defer f.unlock()
	if off < 0 {
		off = f.size
	}
	oldSize := f.size
	defer func() {
		if end := off + int64(written); end > f.size {
			f.size = end
		}
		if f.size != oldSize {
			f.markAttr()
		}
	}()
	written, err = f.writeLocked(p, off, base)
	return written, off, err
}

// writeLocked is the write path under the file's locks.
func (f *File) writeLocked(p []byte, off int64, base io.ReaderAt) (int, error) {
	r := f.r
	bs := int64(r.bs)
	pos, end := off, off+int64(len(p))
	for pos < end {
		lb := uint64(pos / bs)
		pp, run, mapped := f.m.lookup(lb)
		if mapped {
			in := pos % bs
			n := min(end-pos, int64(run)*bs-in)
			if _, err := r.data.WriteAt(p[pos-off:pos-off+n], int64(pp)*bs+in); err != nil {
				return int(pos - off), fmt.Errorf("region: %w", err)
			}
			r.dirty.Store(true)
			pos += n
			continue
		}
		want := min(uint64((end-1)/bs)-lb+1, run)
		r.mu.Lock()
		phys, got, err := r.allocLocked(f, f.goal(lb), want)
		r.mu.Unlock()
		if err != nil {
			return int(pos - off), err
		}
		e := min(end, int64(lb+got)*bs)
		if err := f.fillNew(p[pos-off:e-off], pos, phys, base); err != nil {
			// Never mapped, never recorded: the blocks can go straight back.
			r.mu.Lock()
			r.used -= got
			if e := r.free.add(phys, got); e != nil && r.err == nil {
				r.err = e
			}
			r.mu.Unlock()
			return int(pos - off), err
		}
		f.m.insert(lb, phys, got)
		f.hint = phys + got
		r.mu.Lock()
		r.addRec(record{T: recMap, ID: f.id, A: lb, B: phys, C: got})
		r.mu.Unlock()
		pos = e
	}
	return len(p), nil
}

// goal is where block lb would ideally go: right after its logical
// predecessor, else after the file's last allocation.
func (f *File) goal(lb uint64) uint64 {
	if lb > 0 {
		if p, _, ok := f.m.lookup(lb - 1); ok {
			return p + 1
		}
	}
	return f.hint
}

// fillNew writes chunk (file offset pos) into freshly allocated blocks
// starting at physical block phys. Every block is written whole, so a new
// block never exposes what it held before (another file's freed data).
func (f *File) fillNew(chunk []byte, pos int64, phys uint64, base io.ReaderAt) error {
	r := f.r
	bs := int64(r.bs)
	blk0 := pos / bs * bs
	physOff := int64(phys)*bs - blk0 // add a file offset to get a data-file offset
	s, e := pos, pos+int64(len(chunk))
	if s%bs != 0 || e-s < bs {
		buf := make([]byte, bs)
		if err := f.readBase(buf, blk0, base); err != nil {
			return err
		}
		be := min(e, blk0+bs)
		copy(buf[s-blk0:], chunk[:be-s])
		if _, err := r.data.WriteAt(buf, blk0+physOff); err != nil {
			return fmt.Errorf("region: %w", err)
		}
		s = be
	}
	if full := (e - s) / bs * bs; full > 0 {
		if _, err := r.data.WriteAt(chunk[s-pos:s-pos+full], s+physOff); err != nil {
			return fmt.Errorf("region: %w", err)
		}
		s += full
	}
	if s < e {
		buf := make([]byte, bs)
		if err := f.readBase(buf, s, base); err != nil {
			return err
		}
		copy(buf, chunk[s-pos:])
		if _, err := r.data.WriteAt(buf, s+physOff); err != nil {
			return fmt.Errorf("region: %w", err)
		}
	}
	r.dirty.Store(true)
	return nil
}

// Truncate sets the size. Shrinking frees the blocks past the end and hides
// the base past it; growing exposes zeros.
func (f *File) Truncate(size int64) error {
	if size < 0 {
		return fmt.Errorf("cow: truncate %d to %d: %w", f.id, size, syscall.EINVAL)
	}
	if err := f.lock(); err != nil {
		return fmt.Errorf("cow: truncate %d: %w", f.id, err)
	}
	defer f.unlock()
	if err := f.shrinkLocked(size); err != nil {
		return fmt.Errorf("cow: truncate %d to %d: %w", f.id, size, err)
	}
	if size != f.size {
		f.size = size
		f.markAttr()
	}
	return nil
}

// shrinkLocked drops everything at or past size (a no-op when growing).
// It keeps the invariant that region bytes past the end of the file are
// zero, so a later extend needs no work.
func (f *File) shrinkLocked(size int64) error {
	r := f.r
	bs := int64(r.bs)
	if size < f.size {
		first := uint64((size + bs - 1) / bs)
		r.mu.Lock()
		f.m.remove(first, math.MaxUint64-first, r.freeLocked)
		r.addRec(record{T: recUnmap, ID: f.id, A: first, B: math.MaxUint64 - first})
		r.mu.Unlock()
		if in := size % bs; in != 0 {
			if pp, _, ok := f.m.lookup(uint64(size / bs)); ok {
				if _, err := r.data.WriteAt(make([]byte, bs-in), int64(pp)*bs+in); err != nil {
					return fmt.Errorf("zero tail: %w", err)
				}
				r.dirty.Store(true)
			}
		}
	}
	f.baseLen = min(f.baseLen, size)
	return nil
}

// NewReader streams the merged content from offset 0 to the current size
// (for commit: hash and ingest modified files).
func (f *File) NewReader(base io.ReaderAt) io.Reader {
	return io.NewSectionReader(mergedReader{f, base}, 0, f.Size())
}

type mergedReader struct {
	f    *File
	base io.ReaderAt
}

func (m mergedReader) ReadAt(p []byte, off int64) (int, error) { return m.f.ReadAt(p, off, m.base) }
