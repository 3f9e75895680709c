package cow

import (
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// Region is the copy-on-write store of one active snapshot. It is safe for
// concurrent use.
//
// Locking: syncMu (read side held by every mutating file operation, write
// side by Sync while it swaps the record buffer, so a batch never holds a
// record whose data write has not completed) -> File.mu -> Region.mu
// (allocator, file table, record buffer).
type Region struct {
	dir  string
	opts Options
	bs   uint64
	data *os.File

	syncSerial sync.Mutex // one Sync/checkpoint at a time
	syncMu     sync.RWMutex
	dirty      atomic.Bool // data written since the last fdatasync

	mu       sync.Mutex
	files    map[uint64]*File
	free     freeList
	capBlk   uint64 // data file size in blocks
	cursor   uint64 // next-fit start for files with no placement yet
	used     uint64 // blocks mapped by files
	resv     uint64 // blocks held in per-file placement windows
	pendFree []run  // freed, not yet durable: must not be reused
	pendBlk  uint64
	recs     []record
	attrs    map[uint64]struct{} // files whose size/base changed since last batch
	j        *journal
	err      error // sticky: metadata could not be made durable
	closed   bool
	readOnly bool // OpenReadOnly: no journal, data opened read-only
	// growing: a grow ahead (grow.go) is extending the data file; growDone
	// (on mu) signals its end, growWG lets Close wait for it.
	growing  bool
	growDone *sync.Cond
	growWG   sync.WaitGroup
	// inlineGrows, aheadGrows count grows in a writer's allocation and
	// in the background (tests, Stats).
	inlineGrows, aheadGrows uint64
}

// Open opens or creates the region in dir.
func Open(dir string, opts Options) (*Region, error) {
	opts, err := opts.withDefaults()
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("cow: create region dir: %w", err)
	}
	j, frames, err := openJournal(dir)
	if err != nil {
		return nil, err
	}
	// One process per region: a second opener would corrupt the allocator.
	if err := unix.Flock(int(j.f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		j.close()
		return nil, fmt.Errorf("cow: region %s is in use: %w", dir, err)
	}
	r := &Region{dir: dir, opts: opts, files: map[uint64]*File{}, attrs: map[uint64]struct{}{}, j: j}
	r.growDone = sync.NewCond(&r.mu)
	if len(frames) > 0 && len(frames[0]) > 0 && frames[0][0].T == recCheckpoint {
		r.opts.BlockSize = int(frames[0][0].B) // the region keeps its block size
	}
	r.bs = uint64(r.opts.BlockSize)
	if err := r.openData(); err != nil {
		j.close()
		return nil, err
	}
	if err := r.replay(frames); err != nil {
		r.data.Close()
		j.close()
		return nil, err
	}
	// Start every session from one compact checkpoint: bounds replay time
	// and creates the journal of a new region.
	if len(frames) != 1 {
		if err := r.j.checkpoint(r.stateRecords()); err != nil {
			r.data.Close()
			j.close()
			return nil, err
		}
	}
	return r, nil
}

func (r *Region) openData() error {
	f, err := os.OpenFile(filepath.Join(r.dir, dataName), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("cow: open data file: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return fmt.Errorf("cow: stat data file: %w", err)
	}
	size := st.Size() / int64(r.bs) * int64(r.bs)
	if want := r.opts.Reserve / int64(r.bs) * int64(r.bs); size < want {
		if err := unix.Fallocate(int(f.Fd()), 0, size, want-size); err != nil {
			f.Close()
			return fmt.Errorf("cow: preallocate %d bytes: %w", want, err)
		}
		size = want
	}
	r.data, r.capBlk = f, uint64(size)/r.bs
	return nil
}

// replay rebuilds files and the allocator from the journal frames; free
// space is whatever no file maps.
func (r *Region) replay(frames [][]record) error {
	for _, fr := range frames {
		for _, rec := range fr {
			if err := r.apply(rec); err != nil {
				return err
			}
		}
	}
	var all []run
	for _, f := range r.files {
		for _, e := range f.m.e {
			all = append(all, run{e.P, e.N})
			r.used += e.N
		}
	}
	sort.Slice(all, func(a, b int) bool { return all[a].P < all[b].P })
	next := uint64(0)
	for i, ru := range all {
		if i > 0 && ru.P < all[i-1].P+all[i-1].N {
			return fmt.Errorf("cow: corrupt metadata: physical block %d mapped twice", ru.P)
		}
		if ru.P > next {
			r.free.add(next, ru.P-next)
		}
		next = ru.P + ru.N
	}
	if next > r.capBlk {
		// Should not happen (the data file is synced before maps that
		// point into it), but never leave a map pointing past the end.
		if err := r.data.Truncate(int64(next * r.bs)); err != nil {
			return fmt.Errorf("cow: extend data file: %w", err)
		}
		r.capBlk = next
	}
	if next < r.capBlk {
		r.free.add(next, r.capBlk-next)
	}
	return nil
}

func (r *Region) apply(rec record) error {
	switch rec.T {
	case recCheckpoint:
		if rec.B != r.bs {
			return fmt.Errorf("cow: journal block size %d != %d", rec.B, r.bs)
		}
	case recCreate:
		r.files[rec.ID] = newFile(r, rec.ID)
	case recRemove:
		delete(r.files, rec.ID)
	case recAttr, recMap, recUnmap:
		f := r.files[rec.ID]
		if f == nil {
			return fmt.Errorf("cow: corrupt journal: record %d for unknown file %d", rec.T, rec.ID)
		}
		switch rec.T {
		case recAttr:
			f.size, f.baseSize, f.baseLen = int64(rec.A), int64(rec.B), int64(rec.C)
			f.hasBase = rec.D&attrHasBase != 0
		case recMap:
			f.m.insert(rec.A, rec.B, rec.C)
			f.hint = rec.B + rec.C
		case recUnmap:
			f.m.remove(rec.A, rec.B, func(uint64, uint64) {})
		}
	default:
		return fmt.Errorf("cow: corrupt journal: unknown record type %d", rec.T)
	}
	return nil
}

// stateRecords describes the whole region (checkpoint payload). Callers
// hold syncMu exclusively or are single threaded.
func (r *Region) stateRecords() []record {
	recs := []record{{T: recCheckpoint, A: 1, B: r.bs}}
	ids := make([]uint64, 0, len(r.files))
	for id := range r.files {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	for _, id := range ids {
		f := r.files[id]
		recs = append(recs, record{T: recCreate, ID: id}, f.attrRecord())
		for _, e := range f.m.e {
			recs = append(recs, record{T: recMap, ID: id, A: e.L, B: e.P, C: e.N})
		}
	}
	return recs
}

// addRec queues a metadata record for the next batch. r.mu held.
func (r *Region) addRec(rec record) {
	if rec.T == recMap && len(r.recs) > 0 {
		// Sequential writers produce contiguous maps: keep one record.
		last := &r.recs[len(r.recs)-1]
		if last.T == recMap && last.ID == rec.ID && last.A+last.C == rec.A && last.B+last.C == rec.B {
			last.C += rec.C
			return
		}
	}
	r.recs = append(r.recs, rec)
}

// Create adds an empty file (no base) with the given id.
func (r *Region) Create(id uint64) (*File, error) {
	r.syncMu.RLock()
	defer r.syncMu.RUnlock()
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.usable(); err != nil {
		return nil, err
	}
	if _, ok := r.files[id]; ok {
		return nil, fmt.Errorf("cow: create %d: %w", id, ErrExist)
	}
	f := newFile(r, id)
	r.files[id] = f
	r.addRec(record{T: recCreate, ID: id})
	r.attrs[id] = struct{}{}
	return f, nil
}

// File returns the file with the given id.
func (r *Region) File(id uint64) (*File, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil, ErrClosed
	}
	f, ok := r.files[id]
	if !ok {
		return nil, fmt.Errorf("cow: file %d: %w", id, ErrNotExist)
	}
	return f, nil
}

// Files lists the ids of all files, sorted.
func (r *Region) Files() []uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	ids := make([]uint64, 0, len(r.files))
	for id := range r.files {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids
}

// Remove deletes a file and frees its blocks (reusable after the next Sync).
func (r *Region) Remove(id uint64) error {
	r.syncMu.RLock()
	defer r.syncMu.RUnlock()
	r.mu.Lock()
	f, ok := r.files[id]
	r.mu.Unlock()
	if !ok {
		return fmt.Errorf("cow: remove %d: %w", id, ErrNotExist)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.usable(); err != nil {
		return err
	}
	if r.files[id] != f {
		return fmt.Errorf("cow: remove %d: %w", id, ErrNotExist)
	}
	f.m.remove(0, math.MaxUint64, r.freeLocked)
	r.dropResvLocked(f)
	f.removed = true
	delete(r.files, id)
	delete(r.attrs, id)
	r.addRec(record{T: recRemove, ID: id})
	return nil
}

func (r *Region) usable() error {
	if r.closed {
		return ErrClosed
	}
	return r.err
}

// Close syncs and releases the region.
func (r *Region) Close() error {
	if r.readOnly {
		r.mu.Lock()
		defer r.mu.Unlock()
		if r.closed {
			return nil
		}
		r.closed = true
		return r.data.Close()
	}
	err := r.Sync()
	r.syncSerial.Lock()
	defer r.syncSerial.Unlock()
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil
	}
	r.closed = true
	r.mu.Unlock()
	r.growWG.Wait() // a grow ahead still uses the data file
	r.mu.Lock()
	defer r.mu.Unlock()
	if e := r.data.Close(); err == nil && e != nil {
		err = fmt.Errorf("cow: close data: %w", e)
	}
	if e := r.j.close(); err == nil && e != nil {
		err = fmt.Errorf("cow: close journal: %w", e)
	}
	if errors.Is(err, ErrClosed) {
		err = nil
	}
	return err
}

// Dir is the region's directory.
func (r *Region) Dir() string { return r.dir }

// BlockSize is the region's CoW unit in bytes.
func (r *Region) BlockSize() int { return int(r.bs) }
