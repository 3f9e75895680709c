package cow

import (
	"errors"
	"math"
	"syscall"

	"golang.org/x/sys/unix"
)

// noGoal: the file has no placement preference yet.
const noGoal = math.MaxUint64

// window is how many blocks to hold for a file beyond its current
// allocation, so that its next writes land right after this one even when
// other files allocate in between (like ext4's per-inode preallocation).
// It grows with the file.
func (r *Region) window(f *File) uint64 {
	lo, hi := uint64(r.opts.FileReserve)/r.bs, uint64(r.opts.MaxFileReserve)/r.bs
	// Never let one file's window take more than a quarter of what is
	// free, or concurrent writers would steal each other's windows.
	return min(max(f.m.blocks(), lo), hi, max(r.free.total/4, 1))
}

// allocLocked returns a physical run of 1..want blocks for f, as close to
// goal as possible, and grows the region ahead when it runs low. r.mu held.
func (r *Region) allocLocked(f *File, goal, want uint64) (p, n uint64, err error) {
	p, n, err = r.placeLocked(f, goal, want)
	if err == nil {
		r.maybeGrowAheadLocked()
	}
	return p, n, err
}

// placeLocked is allocLocked without the grow ahead.
func (r *Region) placeLocked(f *File, goal, want uint64) (p, n uint64, err error) {
	if want == 0 {
		return 0, 0, errors.New("cow: zero allocation")
	}
	for attempt := 0; ; attempt++ {
		// The file's own window, when the goal is its front.
		if f.resv.N > 0 && goal == f.resv.P {
			return r.takeResv(f, want)
		}
		// Right after the logical predecessor: perfectly contiguous.
		if goal != noGoal {
			if n := r.free.takeAt(goal, want); n > 0 {
				r.used += n
				return goal, n, nil
			}
		}
		if f.resv.N > 0 {
			return r.takeResv(f, want)
		}
		// A fresh placement: next-fit from the goal (or the region cursor),
		// preferring a run that also fits the file's window.
		if goal == noGoal {
			goal = r.cursor
		}
		win := r.window(f)
		if i := r.free.find(goal, want, want+win); i >= 0 {
			ru := r.free.r[i]
			n = min(want, ru.N)
			r.free.cut(i, ru.P, n)
			r.used += n
			if rest := ru.N - n; rest > 0 && win > 0 {
				w := min(win, rest)
				r.free.takeAt(ru.P+n, w)
				f.resv = run{ru.P + n, w}
				r.resv += w
			}
			r.cursor = ru.P + n + f.resv.N
			return ru.P, n, nil
		}
		if r.growing {
			// A grow ahead is under way: wait for it rather than
			// extending the same range twice.
			r.growDone.Wait()
			attempt-- // not an attempt of ours
			continue
		}
		switch attempt {
		case 0:
			// Grow before taking other files' windows away.
			if err := r.growLocked(want); err != nil {
				if !errors.Is(err, syscall.ENOSPC) {
					return 0, 0, err
				}
				r.stealResvLocked()
			}
		case 1:
			r.stealResvLocked()
		default:
			if r.pendBlk > 0 {
				return 0, 0, errNeedCommit
			}
			return 0, 0, ErrNoSpace
		}
	}
}

func (r *Region) takeResv(f *File, want uint64) (uint64, uint64, error) {
	p := f.resv.P
	n := min(want, f.resv.N)
	f.resv.P += n
	f.resv.N -= n
	r.resv -= n
	r.used += n
	return p, n, nil
}

func (r *Region) dropResvLocked(f *File) {
	if f.resv.N == 0 {
		return
	}
	if r.cursor == f.resv.P+f.resv.N {
		// Nobody placed anything after the window: the next fresh
		// placement starts where the window was, so files written one
		// after the other end up packed together.
		r.cursor = f.resv.P
	}
	if err := r.free.add(f.resv.P, f.resv.N); err != nil && r.err == nil {
		r.err = err
	}
	r.resv -= f.resv.N
	f.resv = run{}
}

// TrimReserve hands the file's placement window back to the free space.
// The rootfs calls it when the last handle of the file is closed: a window
// only helps a file that is still being written, and one left behind by
// every closed file makes a container that writes many small files grow
// its data file by a window per file (2000 new 4 KiB files took over
// 1 GiB of disk) and scatters their blocks a window apart. A later writer
// of the file still continues right after its last block when that is
// free, and otherwise gets a new window.
func (f *File) TrimReserve() {
	f.r.mu.Lock()
	defer f.r.mu.Unlock()
	f.r.dropResvLocked(f)
}

func (r *Region) stealResvLocked() {
	for _, g := range r.files {
		r.dropResvLocked(g)
	}
}

// freeLocked is called for blocks a file no longer maps: they stay
// unusable until the record that unmapped them is durable, so that a crash
// can never resurrect the old map over someone else's new data.
func (r *Region) freeLocked(p, n uint64) {
	r.pendFree = append(r.pendFree, run{p, n})
	r.pendBlk += n
	r.used -= n
}

// release makes committed frees allocatable, punching big runs out of the
// data file first (nobody can own them yet, so the punch cannot race a
// write).
func (r *Region) release(frees []run) {
	if len(frees) == 0 {
		return
	}
	if th := r.opts.PunchThreshold; th > 0 {
		for _, f := range frees {
			if int64(f.N*r.bs) >= th {
				// Best effort: a failed punch only costs disk space.
				_ = unix.Fallocate(int(r.data.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE,
					int64(f.P*r.bs), int64(f.N*r.bs))
			}
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, f := range frees {
		if err := r.free.add(f.P, f.N); err != nil && r.err == nil {
			r.err = err
		}
		r.pendBlk -= f.N
	}
}
