package cow

import (
	"fmt"
)

// Sync makes every write, truncate, create and remove that returned before
// it durable: fdatasync of the data file first, then one journal frame with
// the metadata records, fsync'ed. Blocks freed before it become reusable.
func (r *Region) Sync() error {
	r.syncSerial.Lock()
	defer r.syncSerial.Unlock()
	return r.syncLocked()
}

func (r *Region) syncLocked() error {
	// Swap the batch with writers excluded: every record in it belongs to
	// an operation whose data writes have completed.
	r.syncMu.Lock()
	r.mu.Lock()
	if err := r.usable(); err != nil {
		r.mu.Unlock()
		r.syncMu.Unlock()
		return err
	}
	recs := r.takeBatchLocked()
	frees := r.pendFree
	r.pendFree = nil
	r.mu.Unlock()
	dirty := r.dirty.Swap(false)
	r.syncMu.Unlock()

	if dirty || len(recs) > 0 {
		if err := r.data.Sync(); err != nil {
			return r.fail(fmt.Errorf("cow: fdatasync data: %w", err))
		}
	}
	if len(recs) > 0 {
		if err := r.j.append(recs); err != nil {
			return r.fail(err)
		}
	}
	r.release(frees)
	if limit := max(r.opts.JournalLimit, 2*r.j.ckptSize); r.j.size > limit {
		return r.checkpointLocked()
	}
	return nil
}

// takeBatchLocked returns the queued records plus the current attributes
// of every file whose size or base changed. r.mu held, writers excluded.
func (r *Region) takeBatchLocked() []record {
	recs := r.recs
	r.recs = nil
	for id := range r.attrs {
		if f := r.files[id]; f != nil {
			recs = append(recs, f.attrRecord())
		}
	}
	clear(r.attrs)
	return recs
}

// checkpointLocked replaces the journal by the full state. syncSerial held.
// Writers are excluded only while the state is copied: the fdatasync
// that backs it and the checkpoint file's write, fsync and rename run
// while they go on (a compaction used to stop every write of the
// container for all of that). What they do meanwhile is in r.recs and
// r.dirty for the next batch, which goes after the checkpoint; the
// records taken here are durable only with it, as in the batch path.
func (r *Region) checkpointLocked() error {
	r.syncMu.Lock()
	r.mu.Lock()
	r.recs = nil
	clear(r.attrs)
	frees := r.pendFree
	r.pendFree = nil
	state := r.stateRecords()
	r.mu.Unlock()
	// Every data write the state maps was done before this point: the
	// fdatasync below covers it. Later writes set dirty again.
	r.dirty.Store(false)
	r.syncMu.Unlock()
	if err := r.data.Sync(); err != nil {
		return r.fail(fmt.Errorf("cow: fdatasync data: %w", err))
	}
	if err := r.j.checkpoint(state); err != nil {
		return r.fail(err)
	}
	r.release(frees)
	return nil
}

// fail makes the region unusable: in-memory metadata is now ahead of what
// can be made durable, and continuing would break the crash contract.
func (r *Region) fail(err error) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.err == nil {
		r.err = err
	}
	return err
}

// maybeCommit commits on its own when too many records are buffered.
// Called without locks.
func (r *Region) maybeCommit() error {
	r.mu.Lock()
	n := len(r.recs)
	r.mu.Unlock()
	if n > r.opts.MaxPending {
		return r.Sync()
	}
	return nil
}
