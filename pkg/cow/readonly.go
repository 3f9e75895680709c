package cow

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
)

// ErrReadOnly: a mutating call on a region opened with OpenReadOnly.
var ErrReadOnly = errors.New("cow: region opened read-only")

// OpenReadOnly loads the durable state of the region in dir (what the last
// Sync committed) without locking it, so another process may serve the
// region at the same time (commit and usage run in the snapshotter while
// the rootfs server holds the region). Reads work; every change fails with
// ErrReadOnly. Blocks written after the last Sync may be reused by the
// writer, so the caller should make the writer Sync first and keep it idle.
func OpenReadOnly(dir string) (*Region, error) {
	buf, err := os.ReadFile(filepath.Join(dir, journalName))
	if err != nil {
		return nil, fmt.Errorf("cow: read journal: %w", err)
	}
	frames, _ := decodeFrames(buf)
	r := &Region{dir: dir, files: map[uint64]*File{}, attrs: map[uint64]struct{}{}}
	r.growDone = sync.NewCond(&r.mu)
	r.bs = DefaultBlockSize
	if len(frames) > 0 && len(frames[0]) > 0 && frames[0][0].T == recCheckpoint {
		r.bs = frames[0][0].B
	}
	r.opts.BlockSize = int(r.bs)
	f, err := os.Open(filepath.Join(dir, dataName))
	if err != nil {
		return nil, fmt.Errorf("cow: open data file: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("cow: stat data file: %w", err)
	}
	r.data, r.capBlk = f, uint64(st.Size())/r.bs
	for _, fr := range frames {
		for _, rec := range fr {
			if err := r.apply(rec); err != nil {
				f.Close()
				return nil, err
			}
		}
	}
	for _, fl := range r.files {
		r.used += fl.m.blocks()
	}
	r.err = ErrReadOnly
	r.readOnly = true
	return r, nil
}
