package rootfs

import (
	"context"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/dupsnap/dupsnap/pkg/layout"
)

// A node the kernel still holds can lose its last name to a rename-over
// between the kernel's LOOKUP and its OPEN (a reader opening a file that a
// writer keeps replacing with `mv tmp file`). On a local fs the open gets
// the old inode; here the old file must still exist for that: so the
// region file of a renamed-over node is pinned (its placeholder open, which
// also keeps its host inode number from being reused by the next create
// while the kernel knows it) until the kernel forgets the node, or pinHold
// passed (the race is that short; the space must come back soon: quota).
// Unlink pins nothing: its space is free at once, and an open racing with
// it fails ESTALE, then ENOENT after the kernel's fresh lookup.

// pinHold bounds how long a pin may delay freeing the region file.
const pinHold = time.Second

var _ = (fs.NodeOnForgetter)((*node)(nil))

// pinVictim pins the region file of the upper file at up, whose last name
// is about to go, to victim, the node the kernel may know it by. Caller
// holds r.mu.
func (r *rootFS) pinVictim(victim *fs.Inode, up string) {
	if victim == nil {
		return
	}
	vn, ok := victim.Operations().(*node)
	if !ok || vn.pinned.Load() != nil {
		return
	}
	ci, err := r.acquire(up)
	if err != nil {
		logErr(context.Background(), "pin removed file", up, err)
		return
	}
	if !vn.pinned.CompareAndSwap(nil, ci) {
		r.release(ci)
		return
	}
	time.AfterFunc(pinHold, func() {
		if vn.pinned.CompareAndSwap(ci, nil) {
			r.release(ci)
		}
	})
}

// OnForget drops the pin: the kernel no longer knows this node.
func (n *node) OnForget() {
	n.r.gens.forgot(n.StableAttr().Ino)
	if ci := n.pinned.Swap(nil); ci != nil {
		n.r.release(ci)
	}
}

// openOrphan opens a node that has no name any more: a pinned region file,
// or a clean image file (its content is immutable); anything else is
// ESTALE, which makes the kernel look the name up again.
func (n *node) openOrphan(flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if ci := n.pinned.Load(); ci != nil {
		n.r.cowMu.Lock()
		ci.refs++
		n.r.cowMu.Unlock()
		if flags&syscall.O_TRUNC != 0 && n.r.readOnly {
			n.r.release(ci)
			return nil, 0, syscall.EROFS
		}
		return &cowHandle{r: n.r, ci: ci, n: n}, fuse.FOPEN_KEEP_CACHE, 0
	}
	if n.lower != nil && !writeIntent(flags) && n.lower.Entry.Type == layout.TypeFile {
		es := entryState{lower: n.lower}
		if n.StableAttr().Ino == n.lower.Ino {
			return n.openLower(&es)
		}
	}
	return nil, 0, syscall.ESTALE
}

// orphanAttr is Getattr of a node without a name.
func (n *node) orphanAttr(out *fuse.AttrOut) syscall.Errno {
	if ci := n.pinned.Load(); ci != nil {
		ci.touch()
		var st syscall.Stat_t
		if err := syscall.Fstat(int(ci.meta.Fd()), &st); err != nil {
			return toErrno(err)
		}
		cowAttr(&st, ci.f.Size(), n.StableAttr().Ino, &out.Attr)
		return 0
	}
	if n.lower != nil && n.StableAttr().Ino == n.lower.Ino {
		n.r.lowerAttr(n.lower, &out.Attr)
		return 0
	}
	return syscall.ESTALE
}
