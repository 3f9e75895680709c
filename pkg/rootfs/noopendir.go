package rootfs

import (
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
)

// The kernel is told not to open directories on the server: OPENDIR
// answers ENOSYS, after which the kernel sets no_opendir for the whole
// connection, opens every directory by itself with FOPEN_KEEP_CACHE |
// FOPEN_CACHE_DIR and sends no RELEASEDIR. A warm walk then costs no round
// trip per directory at all (it was an OPENDIR and a RELEASEDIR each,
// even with the listing cached), and the cached listings stay correct
// because every change of a directory goes through this mount and bumps
// the directory's version in the kernel, which drops its cached listing.
//
// READDIR and FSYNCDIR then arrive without a handle (fh 0); go-fuse's
// bridge needs one, so each such request opens a handle of its own for
// its duration, in process (see dirHandle for the offsets).

// OpenDir: see above.
func (c *countedFS) OpenDir(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	defer c.st.since("opendir", time.Now())
	return fuse.ENOSYS
}

func (c *countedFS) ReadDir(cancel <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	defer c.st.since("readdir", time.Now())
	return c.withDir(cancel, in.InHeader, in.Fh, in.Offset > 0, func(fh uint64) fuse.Status {
		r := *in
		r.Fh = fh
		return c.RawFileSystem.ReadDir(cancel, &r, out)
	})
}

func (c *countedFS) ReadDirPlus(cancel <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	defer c.st.since("readdir", time.Now())
	return c.withDir(cancel, in.InHeader, in.Fh, in.Offset > 0, func(fh uint64) fuse.Status {
		r := *in
		r.Fh = fh
		return c.RawFileSystem.ReadDirPlus(cancel, &r, out)
	})
}

func (c *countedFS) FsyncDir(cancel <-chan struct{}, in *fuse.FsyncIn) fuse.Status {
	defer c.st.since("fsync", time.Now())
	return c.withDir(cancel, in.InHeader, in.Fh, false, func(fh uint64) fuse.Status {
		r := *in
		r.Fh = fh
		return c.RawFileSystem.FsyncDir(cancel, &r)
	})
}

// withDir runs fn with a directory handle: fh if the kernel sent one,
// else one opened through the bridge for this request only.
func (c *countedFS) withDir(cancel <-chan struct{}, h fuse.InHeader, fh uint64, resume bool, fn func(fh uint64) fuse.Status) fuse.Status {
	if fh != 0 {
		return fn(fh)
	}
	flags := uint32(syscall.O_RDONLY | syscall.O_DIRECTORY)
	if resume {
		flags |= dirResume
	}
	var out fuse.OpenOut
	if st := c.RawFileSystem.OpenDir(cancel, &fuse.OpenIn{InHeader: h, Flags: flags}, &out); !st.Ok() {
		return st
	}
	defer c.RawFileSystem.ReleaseDir(&fuse.ReleaseIn{InHeader: h, Fh: out.Fh})
	return fn(out.Fh)
}
