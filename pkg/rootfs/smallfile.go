package rootfs

import (
	"context"
	"errors"
	"io"
	"os"
	"sync"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

// smallHandle is an open clean image file smaller than PassthroughMinSize,
// served as an ordinary cached FUSE file instead of with passthrough.
//
// Why: on Linux >= 6.9 every passthrough read invalidates the cached atime
// of the FUSE inode (fuse_file_accessed, unless the whole mount is
// read-only), so after a file was read its next lstat is a GETATTR round
// trip; and a passthrough open costs a CAS open plus a backing-file
// registration, and its release the reverse. For a small file that costs
// more than the read itself. A cached file's inode is S_NOATIME, and with
// FOPEN_KEEP_CACHE a warm open reads nothing through the server: the
// node's first open stores the whole content into the page cache
// (storeCache), later opens do no I/O, and the CAS object is opened only
// if a READ still comes (pages dropped by the kernel).
// The price is that these pages are cached per mount, not shared with
// other containers through the CAS object, which is why large files stay
// passthrough.
//
// Image content never changes, and every later change of the file (copy-
// up into the region, writes, truncate, punch) goes through this mount and
// so through the kernel's page cache of this inode, which the kernel keeps
// coherent itself: cached pages never go stale.
type smallHandle struct {
	r    *rootFS
	dg   digest.Digest
	size int64
	mu   sync.Mutex
	f    *os.File // the CAS object, opened at the first read
}

var (
	_ = (fs.FileReader)((*smallHandle)(nil))
	_ = (fs.FileFlusher)((*smallHandle)(nil))
	_ = (fs.FileFsyncer)((*smallHandle)(nil))
	_ = (fs.FileReleaser)((*smallHandle)(nil))
	_ = (fs.FileLseeker)((*smallHandle)(nil))
)

func (h *smallHandle) file() (*os.File, syscall.Errno) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.f == nil {
		f, err := h.r.cas.OpenFile(h.dg)
		if err != nil {
			logErr(context.Background(), "open object", h.dg.String(), err)
			return nil, syscall.EIO
		}
		h.f = f
	}
	return h.f, 0
}

func (h *smallHandle) Read(ctx context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	f, errno := h.file()
	if errno != 0 {
		return nil, errno
	}
	n, err := f.ReadAt(dest, off)
	if err != nil && n == 0 && !errors.Is(err, io.EOF) {
		return nil, toErrno(err)
	}
	return fuse.ReadResultData(dest[:n]), 0
}

// Flush: see cowHandle.Flush.
func (h *smallHandle) Flush(ctx context.Context) syscall.Errno { return syscall.ENOSYS }

// Fsync: image content is durable in the CAS already.
func (h *smallHandle) Fsync(ctx context.Context, flags uint32) syscall.Errno { return 0 }

func (h *smallHandle) Release(ctx context.Context) syscall.Errno {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.f != nil {
		h.f.Close()
		h.f = nil
	}
	return 0
}

// Lseek: an image file is all data (the CAS object is not sparse-aware).
func (h *smallHandle) Lseek(ctx context.Context, off uint64, whence uint32) (uint64, syscall.Errno) {
	return seekAllData(off, uint64(h.size), whence)
}

// seekAllData is SEEK_DATA/SEEK_HOLE for a file of size bytes without
// holes (one implicit hole at the end).
func seekAllData(off, size uint64, whence uint32) (uint64, syscall.Errno) {
	switch whence {
	case unix.SEEK_DATA:
		if off >= size {
			return 0, syscall.ENXIO
		}
		return off, 0
	case unix.SEEK_HOLE:
		if off >= size {
			return 0, syscall.ENXIO
		}
		return size, 0
	}
	return 0, syscall.EINVAL
}

// storeCache puts the whole content of the small image file of n into the
// kernel's page cache (FUSE_NOTIFY_STORE), at its first open: the reads
// that follow are then page-cache hits. A READ served by the daemon would
// cost a round trip and, worse, make the kernel invalidate the inode's
// atime (fuse_invalidate_atime after every uncached read on a writable
// mount), so the next lstat of the file would be a GETATTR round trip
// too. A store that ends within i_size invalidates nothing. If the kernel
// drops these pages later, READ (smallHandle.Read) still works.
func (n *node) storeCache(h *smallHandle) {
	f, errno := h.file()
	if errno != 0 {
		return
	}
	bp := storeBufs.Get().(*[]byte)
	defer storeBufs.Put(bp)
	if int64(cap(*bp)) < h.size {
		*bp = make([]byte, h.size)
	}
	buf := (*bp)[:h.size]
	k, err := f.ReadAt(buf, 0)
	if int64(k) != h.size {
		logErr(context.Background(), "read object", h.dg.String(), err)
		return
	}
	if n.WriteCache(0, buf) == 0 {
		n.cached.Store(true)
	}
}

var storeBufs = sync.Pool{New: func() any { b := make([]byte, 0, 64<<10); return &b }}
