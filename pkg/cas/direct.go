package cas

import (
	"errors"
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// With Options.DirectWrites, streamed objects (over one chunk) of a
// durable, uncompressed store are written with O_DIRECT: the data goes
// from the put's own buffer to the
// device while the caller hashes on, with no page-cache copy and no
// writeback left for Commit's syncs (measured on the 2-core test VM, 123
// MiB layer: ~20 ms less of the process's CPU and ~10-80 ms less of
// kworker CPU per import, and Commit no longer waits for the data).
// Durability is unchanged: O_DIRECT alone promises nothing about the
// device's write cache or the file's metadata, so Commit still does its
// syncfs (or fdatasync) before any final name exists, exactly as for
// buffered temps. The price: a new large object is not in the page cache
// until first read. NoSync stores (tests, the no_sync bench) keep buffered
// writes: there the page cache is the point.
//
// Not the default: on a quiet test VM (virtio disk, load ~2.5) the
// durable ingest bench (benchreport --only store, 5 reps, 3 interleaved
// pairs) ran 658-668 MB/s with it against 722-796 MB/s buffered; under
// heavy load it had saved CPU. Measure on your disks before turning it on.

// directAlign is the alignment O_DIRECT needs for buffer address, file
// offset and length (the page size covers every logical block size here).
const directAlign = 4096

// wantDirect says whether a streamed temp should be written with O_DIRECT.
func (b *Batch) wantDirect() bool {
	s := b.s
	return s.opts.DirectWrites && !s.opts.NoSync && !s.opts.Compress && !s.noDirect.Load()
}

// writeChunk writes one chunk of a streamed object. A direct temp takes
// aligned chunks straight to the device; the first unaligned one (the
// stream's tail) turns O_DIRECT off and goes through the page cache (Commit's
// syncfs makes it durable like any buffered temp).
func (b *Batch) writeChunk(t *tempObj, data []byte) error {
	if t.direct {
		n := len(data) &^ (directAlign - 1)
		if uintptr(unsafe.Pointer(unsafe.SliceData(data)))%directAlign != 0 {
			n = 0
		}
		if n > 0 {
			b.s.directWrites.Add(1)
			if _, err := fdWriter(t.fd).Write(data[:n]); err != nil {
				if !errors.Is(err, unix.EINVAL) {
					return fmt.Errorf("cas: write temp: %w", err)
				}
				b.s.noDirect.Store(true)
				n = 0
			}
			data = data[n:]
		}
		if len(data) > 0 {
			if err := setDirect(t.fd, false); err != nil {
				return err
			}
			t.direct = false
		}
	}
	if len(data) == 0 {
		return nil
	}
	if _, err := fdWriter(t.fd).Write(data); err != nil {
		return fmt.Errorf("cas: write temp: %w", err)
	}
	return nil
}

func setDirect(fd int, on bool) error {
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil {
		return fmt.Errorf("cas: get temp flags: %w", err)
	}
	if on {
		fl |= unix.O_DIRECT
	} else {
		fl &^= unix.O_DIRECT
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFL, fl); err != nil {
		return fmt.Errorf("cas: set temp flags: %w", err)
	}
	return nil
}
