package cow

import (
	"errors"
	"fmt"
	"io"
	"syscall"

	"golang.org/x/sys/unix"
)

// Fallocate implements fallocate(2) modes 0, FALLOC_FL_KEEP_SIZE,
// FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE and FALLOC_FL_ZERO_RANGE
// (optionally with KEEP_SIZE); others fail with EOPNOTSUPP. base is the
// file's base reader (needed to copy the rest of a partially zeroed block).
//
// Allocation reserves region blocks for holes and for the range past the
// visible base; blocks still backed by the base are not copied (that would
// be a whole-file copy-up), so a later first write to them can still hit
// the region's cap.
func (f *File) Fallocate(mode uint32, off, length int64, base io.ReaderAt) error {
	if off < 0 || length <= 0 || off+length < off {
		return fmt.Errorf("cow: fallocate %d [%d,+%d): %w", f.id, off, length, syscall.EINVAL)
	}
	keep := mode&unix.FALLOC_FL_KEEP_SIZE != 0
	var op func(off, length int64, keep bool, base io.ReaderAt) error
	switch mode &^ unix.FALLOC_FL_KEEP_SIZE {
	case 0:
		op = f.allocateOnce
	case unix.FALLOC_FL_PUNCH_HOLE:
		if !keep {
			return fmt.Errorf("cow: fallocate %d: punch hole needs KEEP_SIZE: %w", f.id, syscall.EOPNOTSUPP)
		}
		op = f.zeroOnce
	case unix.FALLOC_FL_ZERO_RANGE:
		op = f.zeroOnce
	default:
		return fmt.Errorf("cow: fallocate %d mode %#x: %w", f.id, mode, syscall.EOPNOTSUPP)
	}
	// Both operations are idempotent, so a retry after committing pending
	// frees simply redoes the range.
	err := op(off, length, keep, base)
	if errors.Is(err, errNeedCommit) {
		if err = f.r.Sync(); err == nil {
			err = op(off, length, keep, base)
		}
	}
	if errors.Is(err, errNeedCommit) {
		err = ErrNoSpace
	}
	if err != nil {
		return fmt.Errorf("cow: fallocate %d [%d,+%d): %w", f.id, off, length, err)
	}
	return f.r.maybeCommit()
}

// allocateOnce maps zeroed blocks over every hole of [off, off+length) not
// backed by the base, then extends the size unless keep.
func (f *File) allocateOnce(off, length int64, keep bool, _ io.ReaderAt) error {
	if err := f.lock(); err != nil {
		return err
	}
	defer f.unlock()
	r := f.r
	bs := int64(r.bs)
	lb, endBlk := uint64(off/bs), uint64((off+length+bs-1)/bs)
	// Blocks that hold any visible base byte stay with the base.
	if baseBlk := uint64((f.baseLen + bs - 1) / bs); lb < baseBlk {
		lb = baseBlk
	}
	for lb < endBlk {
		_, run, mapped := f.m.lookup(lb)
		n := min(run, endBlk-lb)
		if mapped {
			lb += n
			continue
		}
		if err := f.mapZero(lb, n); err != nil {
			return err
		}
		lb += n
	}
	if end := off + length; !keep && end > f.size {
		f.size = end
		f.markAttr()
	}
	return nil
}

// mapZero maps up to n (all, unless an error) new zeroed blocks at lb.
func (f *File) mapZero(lb, n uint64) error {
	r := f.r
	bs := int64(r.bs)
	for n > 0 {
		r.mu.Lock()
		phys, got, err := r.allocLocked(f, f.goal(lb), n)
		r.mu.Unlock()
		if err != nil {
			return err
		}
		// The blocks may hold another file's freed data: zero them before
		// they can be mapped (ZERO_RANGE keeps them allocated on disk).
		if err := unix.Fallocate(int(r.data.Fd()), unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE,
			int64(phys)*bs, int64(got)*bs); err != nil {
			r.mu.Lock()
			r.used -= got
			if e := r.free.add(phys, got); e != nil && r.err == nil {
				r.err = e
			}
			r.mu.Unlock()
			return fmt.Errorf("region: zero range: %w", err)
		}
		r.dirty.Store(true)
		f.m.insert(lb, phys, got)
		f.hint = phys + got
		r.mu.Lock()
		r.addRec(record{T: recMap, ID: f.id, A: lb, B: phys, C: got})
		r.mu.Unlock()
		lb, n = lb+got, n-got
	}
	return nil
}

// zeroOnce makes [off, off+length) read as zeros (within the file for
// KEEP_SIZE; extending it otherwise): whole blocks with no base under them
// become holes, whole blocks over the base become zeroed region blocks,
// partial blocks are written with zeros.
func (f *File) zeroOnce(off, length int64, keep bool, base io.ReaderAt) error {
	if err := f.lock(); err != nil {
		return err
	}
	defer f.unlock()
	r := f.r
	bs := int64(r.bs)
	end := min(off+length, f.size)
	oldSize := f.size
	defer func() {
		if f.size != oldSize {
			f.markAttr()
		}
	}()
	for pos := off; pos < end; {
		lb := uint64(pos / bs)
		blkEnd := int64(lb+1) * bs
		if pos%bs != 0 || end < blkEnd {
			e := min(end, blkEnd)
			if _, _, mapped := f.m.lookup(lb); !mapped && int64(lb)*bs >= f.baseLen {
				pos = e // a hole past the base already reads zeros
				continue
			}
			if _, err := f.writeLocked(make([]byte, e-pos), pos, base); err != nil {
				return err
			}
			pos = e
			continue
		}
		// Whole blocks [lb, lb+n).
		n := uint64((end - pos) / bs)
		if int64(lb)*bs < f.baseLen {
			n = min(n, uint64((f.baseLen+bs-1)/bs)-lb)
			pp, run, mapped := f.m.lookup(lb)
			n = min(n, run)
			if mapped {
				if err := unix.Fallocate(int(r.data.Fd()), unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE,
					int64(pp)*bs, int64(n)*bs); err != nil {
					return fmt.Errorf("region: zero range: %w", err)
				}
				r.dirty.Store(true)
			} else if err := f.mapZero(lb, n); err != nil {
				return err
			}
		} else {
			r.mu.Lock()
			f.m.remove(lb, n, r.freeLocked)
			r.addRec(record{T: recUnmap, ID: f.id, A: lb, B: n})
			r.mu.Unlock()
		}
		pos += int64(n) * bs
	}
	if e := off + length; !keep && e > f.size {
		f.size = e // past the old end reads zeros already
	}
	return nil
}
