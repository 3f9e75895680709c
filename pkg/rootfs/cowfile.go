package rootfs

import (
	"context"
	"errors"
	"io"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// cowHandle is an open file whose data lives in the region: every read
// and write goes through the daemon. It deliberately does not implement
// fs.FilePassthroughFder: go-fuse hands an inode's existing backing file
// (the read-only CAS object of an earlier clean open) to every later open
// that implements it, and writes through that would fail with EBADF.
type cowHandle struct {
	r  *rootFS
	ci *cowInode
	n  *node
}

var (
	_ = (fs.FileReader)((*cowHandle)(nil))
	_ = (fs.FileWriter)((*cowHandle)(nil))
	_ = (fs.FileFsyncer)((*cowHandle)(nil))
	_ = (fs.FileFlusher)((*cowHandle)(nil))
	_ = (fs.FileReleaser)((*cowHandle)(nil))
	_ = (fs.FileGetattrer)((*cowHandle)(nil))
	_ = (fs.FileLseeker)((*cowHandle)(nil))
	_ = (fs.FileAllocater)((*cowHandle)(nil))
)

// openCow opens the region file of the upper file at up for node n.
func (n *node) openCow(up string, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	ci, err := n.r.acquire(up)
	if err != nil {
		logErr(context.Background(), "open region file", up, err)
		return nil, 0, toErrno(err)
	}
	if flags&syscall.O_TRUNC != 0 {
		if err := ci.f.Truncate(0); err != nil {
			n.r.release(ci)
			return nil, 0, toErrno(err)
		}
		ci.dirty.Store(true)
	}
	// Every change of a region file goes through this mount (writes fill
	// the kernel's page cache, truncate and punch drop it), so the cache
	// stays valid across opens: a reopen reads at page-cache speed instead
	// of one daemon round trip per 128 KiB.
	return &cowHandle{r: n.r, ci: ci, n: n}, fuse.FOPEN_KEEP_CACHE, 0
}

func (h *cowHandle) Read(ctx context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	h.r.ops.Add(1)
	k, err := h.ci.f.ReadAt(dest, off, h.ci.base)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, toErrno(err)
	}
	// A vector result goes to /dev/fuse with one writev. ReadResultData
	// would first be tried as a splice: go-fuse then grows a pipe and
	// writes the reply header into it for every READ, and for a 1 MiB READ
	// (header + payload > pipe-max-size) fails and logs an error each time.
	return fuse.ReadResultVector([][]byte{dest[:k]}), 0
}

func (h *cowHandle) Write(ctx context.Context, data []byte, off int64) (uint32, syscall.Errno) {
	h.r.ops.Add(1)
	k, err := h.ci.f.WriteAt(data, off, h.ci.base)
	if k > 0 {
		h.ci.dirty.Store(true)
	}
	if err != nil && k == 0 {
		return 0, toErrno(err)
	}
	return uint32(k), 0
}

// Flush answers ENOSYS: the kernel then stops sending FLUSH on this
// connection, one daemon round trip less per close(2) of any file. Nothing
// needs it: data is written through (no writeback cache, which would turn
// off passthrough), and the lazy mtime update happens at the next getattr
// or at release.
func (h *cowHandle) Flush(ctx context.Context) syscall.Errno { return syscall.ENOSYS }

func (h *cowHandle) Fsync(ctx context.Context, flags uint32) syscall.Errno {
	return toErrno(h.r.syncCow(h.ci))
}

func (h *cowHandle) Release(ctx context.Context) syscall.Errno {
	h.r.release(h.ci)
	return 0
}

func (h *cowHandle) Getattr(ctx context.Context, out *fuse.AttrOut) syscall.Errno {
	h.ci.touch()
	var st syscall.Stat_t
	if err := syscall.Fstat(int(h.ci.meta.Fd()), &st); err != nil {
		return toErrno(err)
	}
	cowAttr(&st, h.ci.f.Size(), h.n.StableAttr().Ino, &out.Attr)
	return 0
}

// cowAttr is the attr of a region file: metadata from the placeholder,
// size from the region.
func cowAttr(st *syscall.Stat_t, size int64, ino uint64, a *fuse.Attr) {
	upperAttr(st, ino, a)
	a.Size = uint64(size)
	a.Blocks = (a.Size + 511) / 512
	a.Blksize = 4096
}

func (h *cowHandle) Lseek(ctx context.Context, off uint64, whence uint32) (uint64, syscall.Errno) {
	return seekAllData(off, uint64(h.ci.f.Size()), whence)
}

func (h *cowHandle) Allocate(ctx context.Context, off, size uint64, mode uint32) syscall.Errno {
	err := h.ci.f.Fallocate(mode, int64(off), int64(size), h.ci.base)
	if err == nil {
		h.ci.dirty.Store(true)
	}
	return toErrno(err)
}
