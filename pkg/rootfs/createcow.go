package rootfs

import (
	"context"
	"os"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/dupsnap/dupsnap/pkg/layout"
)

// createCow finishes the Create of a new region file at dp/name whose
// upper placeholder f was just made (O_EXCL). Everything goes through f's
// descriptor, not the path (owner, mode, attr), and f stays open as the
// placeholder handle: creating many small files is dominated by such
// per-file syscalls. Caller holds r.mu (write).
func (n *node) createCow(ctx context.Context, d *entryState, dp, name string, mode uint32, f *os.File, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	up := f.Name()
	fail := func(err error) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
		f.Close()
		os.Remove(up)
		return nil, nil, 0, toErrno(err)
	}
	ref, err := n.r.markCow(f, &layout.Entry{})
	if err != nil {
		return fail(err)
	}
	if c, ok := ctx.(*fuse.Context); ok {
		uid, gid := int(c.Uid), int(c.Gid)
		var pst syscall.Stat_t
		if err := syscall.Lstat(n.r.upperPath(dp), &pst); err == nil && pst.Mode&syscall.S_ISGID != 0 {
			gid = int(pst.Gid)
		}
		if err := f.Chown(uid, gid); err != nil {
			return fail(err)
		}
	}
	// Explicit chmod: the server's umask must not apply twice.
	if err := syscall.Fchmod(int(f.Fd()), mode&07777); err != nil {
		return fail(err)
	}
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		return fail(err)
	}
	ci, err := n.r.acquireNew(up, ref, f)
	if err != nil {
		return fail(err)
	}
	delete(n.r.copyup, st.Ino) // a reused st_ino is a new inode
	ch := n.r.newUpperInode(ctx, n.EmbeddedInode(), syscall.S_IFREG, st.Ino)
	upperAttr(&st, ch.StableAttr().Ino, &out.Attr)
	return ch, &cowHandle{r: n.r, ci: ci, n: ch.Operations().(*node)}, fuse.FOPEN_KEEP_CACHE, 0
}
