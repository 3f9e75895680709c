package cow

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// Growing the data file is an fallocate, and on a busy host filesystem
// that is not cheap: ext4's allocator may have to read block bitmaps from
// disk (seen taking 130 ms under other I/O, with the region's lock held
// and the container's write waiting). So once a region is being written
// in earnest it grows ahead, in the background, while there is still
// free space: a writer only waits for a grow when it outruns it.

// maxAheadSteps caps a grow ahead at this many GrowSteps.
const maxAheadSteps = 8

// aheadLocked is how much a grow ahead adds: a GrowStep, more for a
// region that is already big (a quarter of its size), so that a fast
// sequential writer does not catch up with the grows. r.mu held.
func (r *Region) aheadLocked() int64 {
	return min(max(r.opts.GrowStep, int64(r.capBlk*r.bs)/4), maxAheadSteps*r.opts.GrowStep)
}

// maybeGrowAheadLocked starts a grow ahead when less than half of one is
// left free and the region has used at least half its initial reserve (a
// container that changes a few blocks never gets one: its disk stays at
// the reserve). r.mu held.
func (r *Region) maybeGrowAheadLocked() {
	if r.growing || r.closed || r.readOnly || r.err != nil {
		return
	}
	ahead := r.aheadLocked()
	if int64(r.free.total*r.bs) >= ahead/2 || int64(r.used*r.bs)*2 < r.opts.Reserve {
		return
	}
	step := r.stepLocked(ahead)
	if step <= 0 {
		return
	}
	r.growing = true
	r.growWG.Add(1)
	go r.growAhead(int64(r.capBlk*r.bs), step)
}

// stepLocked bounds a grow of want bytes by MaxSize (0: at the cap).
func (r *Region) stepLocked(want int64) int64 {
	step := (want + int64(r.bs) - 1) / int64(r.bs) * int64(r.bs)
	if r.opts.MaxSize > 0 {
		limit := r.opts.MaxSize / int64(r.bs) * int64(r.bs)
		step = min(step, limit-int64(r.capBlk*r.bs))
	}
	return step
}

// growAhead extends the data file from capB by step without the region's
// lock, then hands the new blocks to the allocator. Nothing else extends
// the file meanwhile: allocLocked waits for r.growing to clear.
func (r *Region) growAhead(capB, step int64) {
	defer r.growWG.Done()
	err := unix.Fallocate(int(r.data.Fd()), 0, capB, step)
	r.mu.Lock()
	defer r.mu.Unlock()
	r.growing = false
	defer r.growDone.Broadcast()
	r.aheadGrows++
	if err != nil || r.closed {
		// Best effort: the next allocation that needs space grows (and
		// reports the error, e.g. ENOSPC of the host) itself.
		return
	}
	if err := r.extendLocked(uint64(step) / r.bs); err != nil && r.err == nil {
		r.err = err // two owners of a block: stop before it spreads
	}
}

// extendLocked makes nb blocks past the old end allocatable. r.mu held.
func (r *Region) extendLocked(nb uint64) error {
	if err := r.free.add(r.capBlk, nb); err != nil {
		return err
	}
	r.capBlk += nb
	r.dirty.Store(true) // the new size must reach disk before maps into it
	return nil
}

// growLocked extends the data file by a step (at least want blocks),
// within MaxSize, in the caller's allocation. r.mu held, no grow ahead
// running.
func (r *Region) growLocked(want uint64) error {
	step := r.stepLocked(max(r.opts.GrowStep, int64(want*r.bs)))
	if step <= 0 {
		return ErrNoSpace
	}
	capB := int64(r.capBlk * r.bs)
	if err := unix.Fallocate(int(r.data.Fd()), 0, capB, step); err != nil {
		return fmt.Errorf("cow: grow region to %d bytes: %w", capB+step, err)
	}
	r.inlineGrows++
	return r.extendLocked(uint64(step) / r.bs)
}
