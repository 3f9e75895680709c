package rootfs

import (
	"context"
	"errors"
	"io"
	"os"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/dupsnap/dupsnap/pkg/layout"
)

// fileHandle is an open regular file: either the read-only CAS object of a
// clean image file, or the data of an upper file.
type fileHandle struct {
	obj  *os.File // CAS object (read-only), nil for empty image files
	data dataFile // upper content
	up   bool
	ino  uint64
	pt   *node // counted in pt.pt while open (passthrough to obj)
	bk   *node // obj is bk's shared backing (see backing.go): not ours to close
	noPT bool  // writes must come as requests (killpriv.go)
}

var (
	_ = (fs.NodeOpener)((*node)(nil))
	_ = (fs.FilePassthroughFder)((*fileHandle)(nil))
	_ = (fs.FileReader)((*fileHandle)(nil))
	_ = (fs.FileWriter)((*fileHandle)(nil))
	_ = (fs.FileFsyncer)((*fileHandle)(nil))
	_ = (fs.FileFlusher)((*fileHandle)(nil))
	_ = (fs.FileReleaser)((*fileHandle)(nil))
	_ = (fs.FileGetattrer)((*fileHandle)(nil))
	_ = (fs.FileLseeker)((*fileHandle)(nil))
	_ = (fs.FileAllocater)((*fileHandle)(nil))
)

func writeIntent(flags uint32) bool {
	return flags&syscall.O_ACCMODE != syscall.O_RDONLY || flags&syscall.O_TRUNC != 0
}

func (n *node) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if writeIntent(flags) && n.r.readOnly {
		return nil, 0, syscall.EROFS
	}
	if _, ok := n.path(); !ok {
		return n.openNameless(ctx, flags)
	}
	if !writeIntent(flags) {
		n.r.mu.RLock()
		es, p, errno := n.state()
		if errno == 0 && es.up && n.pt.Load() == 0 && n.r.region != nil && es.st.Mode&syscall.S_IFMT == syscall.S_IFREG {
			if _, ok := readCowRef(n.r.upperPath(p)); ok {
				// Still under the lock: a rename must not put another
				// file at p between the check and the open.
				defer n.r.mu.RUnlock()
				return n.openCow(n.r.upperPath(p), flags)
			}
		}
		n.r.mu.RUnlock()
		if errno == syscall.ESTALE {
			return n.openNameless(ctx, flags) // lost its name just now
		}
		if errno != 0 {
			return nil, 0, errno
		}
		if !es.up {
			return n.openLowerCtx(ctx, &es)
		}
		if n.pt.Load() > 0 {
			n.r.mu.Lock()
			defer n.r.mu.Unlock()
			return nil, 0, n.newIdentity(&es.st)
		}
		// Anything else (a plain upper file, or a region file that a
		// rename put at p after the check above) is opened below, under
		// the write lock.
	}
	n.r.mu.Lock()
	defer n.r.mu.Unlock()
	es, p, errno := n.state()
	if errno == syscall.ESTALE {
		return n.openNameless(ctx, flags)
	}
	if errno != 0 {
		return nil, 0, errno
	}
	if !es.up {
		if err := n.r.copyUp(ctx, p, es.lower); err != nil {
			logErr(ctx, "copy-up", p, err)
			return nil, 0, toErrno(err)
		}
	}
	if n.pt.Load() > 0 {
		var st syscall.Stat_t
		if err := syscall.Lstat(n.r.upperPath(p), &st); err != nil {
			return nil, 0, toErrno(err)
		}
		return nil, 0, n.newIdentity(&st)
	}
	if n.r.region != nil {
		if _, ok := readCowRef(n.r.upperPath(p)); ok {
			return n.openCow(n.r.upperPath(p), flags)
		}
	}
	d, err := os.OpenFile(n.r.upperPath(p), os.O_RDWR, 0)
	if err != nil {
		return nil, 0, toErrno(err)
	}
	if flags&syscall.O_TRUNC != 0 {
		if err := d.Truncate(0); err != nil {
			d.Close()
			return nil, 0, toErrno(err)
		}
	}
	h, fl := upperHandle(d, n.StableAttr().Ino, flags)
	return h, fl, 0
}

// openNameless opens a node without a name: a clean image file as
// openLowerCtx (with passthrough), anything else through openOrphan.
func (n *node) openNameless(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if n.pinned.Load() == nil && n.lower != nil && !writeIntent(flags) &&
		n.lower.Entry.Type == layout.TypeFile && n.StableAttr().Ino == n.lower.Ino {
		es := entryState{lower: n.lower}
		return n.openLowerCtx(ctx, &es)
	}
	return n.openOrphan(flags)
}

// newIdentity handles an open of a modified file whose kernel inode still
// has passthrough opens of its clean CAS object. The kernel wants every
// open of such an inode to be passthrough to that same backing file (a
// writable one would write into the CAS object), so the modified file gets
// a new inode number and the open fails with ESTALE: the VFS then retries
// it once with a fresh lookup, which finds the new inode. Readers already
// open keep reading the old content, as they would after a rename-over.
func (n *node) newIdentity(st *syscall.Stat_t) syscall.Errno {
	delete(n.r.copyup, st.Ino) // caller holds r.mu (write)
	return syscall.ESTALE
}

// openLower opens a clean image file: the kernel reads its CAS object
// directly (passthrough), sharing page cache with every other container;
// files below PassthroughMinSize are cached FUSE files (see smallHandle).
func (n *node) openLower(es *entryState) (fs.FileHandle, uint32, syscall.Errno) {
	return n.openLowerCtx(nil, es)
}

// openLowerCtx is openLower for an OPEN request (ctx): only then can the
// reply carry the passthrough backing (see rootFS.passthroughOpen).
func (n *node) openLowerCtx(ctx context.Context, es *entryState) (fs.FileHandle, uint32, syscall.Errno) {
	e := &es.lower.Entry
	if e.Size > 0 && e.Size < n.r.ptMin {
		h := &smallHandle{r: n.r, dg: e.Digest, size: e.Size}
		if !n.cached.Load() {
			n.storeCache(h)
		}
		return h, fuse.FOPEN_KEEP_CACHE, 0
	}
	h := &fileHandle{ino: es.lower.Ino}
	if e.Size > 0 {
		f, id, errno := n.acquireBacking(e.Digest)
		if errno != 0 {
			return nil, 0, errno
		}
		h.obj, h.bk = f, n
		h.pt = n
		n.pt.Add(1)
		n.r.passthroughOpen(ctx, id)
	}
	return h, fuse.FOPEN_KEEP_CACHE, 0
}

// PassthroughFd: upper files only; a clean image file's backing is
// registered by backing.go and kept across opens.
func (h *fileHandle) PassthroughFd() (int, bool) {
	if h.data != nil && !h.noPT {
		if fd := h.data.Fd(); fd != ^uintptr(0) {
			return int(fd), true
		}
	}
	return -1, false
}

func (h *fileHandle) Read(ctx context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	var n int
	var err error
	switch {
	case h.obj != nil:
		n, err = h.obj.ReadAt(dest, off)
	case h.data != nil:
		n, err = h.data.ReadAt(dest, off)
	}
	if err != nil && n == 0 && !errors.Is(err, io.EOF) {
		return nil, toErrno(err)
	}
	return fuse.ReadResultData(dest[:n]), 0
}

func (h *fileHandle) Write(ctx context.Context, data []byte, off int64) (uint32, syscall.Errno) {
	if h.data == nil {
		return 0, syscall.EBADF
	}
	n, err := h.data.WriteAt(data, off)
	return uint32(n), toErrno(err)
}

// Flush: see cowHandle.Flush.
func (h *fileHandle) Flush(ctx context.Context) syscall.Errno { return syscall.ENOSYS }

func (h *fileHandle) Fsync(ctx context.Context, flags uint32) syscall.Errno {
	if h.data == nil {
		return 0
	}
	return toErrno(h.data.Sync())
}

func (h *fileHandle) Release(ctx context.Context) syscall.Errno {
	if h.bk != nil {
		h.bk.releaseBacking()
	} else if h.obj != nil {
		h.obj.Close()
	}
	if h.pt != nil {
		h.pt.pt.Add(-1)
	}
	if h.data != nil {
		h.data.Close()
	}
	return 0
}

func (h *fileHandle) Getattr(ctx context.Context, out *fuse.AttrOut) syscall.Errno {
	if h.data == nil {
		return syscall.ENOTSUP
	}
	fi, err := h.data.Stat()
	if err != nil {
		return toErrno(err)
	}
	upperAttr(fi.Sys().(*syscall.Stat_t), h.ino, &out.Attr)
	return 0
}

func (h *fileHandle) fd() int {
	if h.obj != nil {
		return int(h.obj.Fd())
	}
	if h.data != nil {
		return int(h.data.Fd())
	}
	return -1
}

func (h *fileHandle) Lseek(ctx context.Context, off uint64, whence uint32) (uint64, syscall.Errno) {
	fd := h.fd()
	if fd < 0 {
		return 0, syscall.ENXIO // empty file: no data, and EOF is 0
	}
	n, err := unix.Seek(fd, int64(off), int(whence))
	return uint64(n), toErrno(err)
}

func (h *fileHandle) Allocate(ctx context.Context, off, size uint64, mode uint32) syscall.Errno {
	if h.data == nil {
		return syscall.EBADF
	}
	return toErrno(unix.Fallocate(int(h.data.Fd()), mode, int64(off), int64(size)))
}
