package rootfs

import (
	"context"
	"strings"
	"sync/atomic"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/dupsnap/dupsnap/pkg/layout"
)

// node is one inode of the mounted tree. It is path based like overlayfs:
// what a name is (image entry, upper entry, whiteout) is read from the
// upper dir at the node's current path, so renames and a restart of the
// server need no bookkeeping beyond the upper dir itself.
type node struct {
	fs.Inode
	r *rootFS
	// lower is the image inode this node came from (nil for new files).
	// It applies only while no upper entry shadows the node's path.
	lower *layout.Node
	// pt counts open passthrough handles of the clean image file (a later
	// region open must then be direct I/O, see openCow).
	pt atomic.Int32
	// pinned keeps the region file of this node alive after its last
	// name went, until the kernel forgets the node (see orphan.go).
	pinned atomic.Pointer[cowInode]
	// cached: the content of this clean small image file was stored in
	// the kernel's page cache (see smallHandle).
	cached atomic.Bool
	// dirSnap is the listing of an upper directory that READDIRs after
	// the first continue (see dirHandle).
	dirSnap atomic.Pointer[[]fuse.DirEntry]
	// bk is the passthrough backing of a clean image file (backing.go).
	bk backing
	// refreshWant: the refresher waits for a GETATTR (refresh.go).
	refreshWant atomic.Bool
}

var (
	_ = (fs.NodeLookuper)((*node)(nil))
	_ = (fs.NodeGetattrer)((*node)(nil))
	_ = (fs.NodeReadlinker)((*node)(nil))
	_ = (fs.NodeGetxattrer)((*node)(nil))
	_ = (fs.NodeListxattrer)((*node)(nil))
	_ = (fs.NodeStatfser)((*node)(nil))
	_ = (fs.NodeOpendirHandler)((*node)(nil))
)

func fsErrno(err error) syscall.Errno { return fs.ToErrno(err) }

// path is n's current path below the mount root ("" for the root); ok is
// false for a node that has no name any more (renamed over, unlinked, or
// evicted because a new file got its inode number). Inode.Path would give
// "" for such a node, which is the root: the cause of "is a directory"
// when a reader opened a file a concurrent rename had just replaced.
func (n *node) path() (string, bool) {
	var buf [16]string // on the stack: no allocation but the result's
	segs := buf[:0]
	p := n.EmbeddedInode()
	for !p.IsRoot() {
		name, parent := p.Parent()
		if parent == nil {
			return "", false
		}
		segs = append(segs, name)
		p = parent
	}
	for i, j := 0, len(segs)-1; i < j; i, j = i+1, j-1 {
		segs[i], segs[j] = segs[j], segs[i]
	}
	return strings.Join(segs, "/"), true
}

// state is what n's path currently is, and that path. A node without a
// path is ESTALE: the kernel then drops its dentry and looks the name up
// again (open, stat and friends retry once with a fresh lookup).
func (n *node) state() (entryState, string, syscall.Errno) {
	p, ok := n.path()
	if !ok {
		return entryState{}, "", syscall.ESTALE
	}
	es, errno := n.r.stateAt(p, n.lower)
	if errno == 0 && !es.exists() {
		errno = syscall.ENOENT
	}
	if errno == 0 && es.up && !n.IsRoot() && !n.owns(&es.st) {
		// The upper dir already has another file at n's path, but go-fuse
		// has not moved n yet: a rename's tree update runs only after its
		// handler returned. Never answer for n with that file's data.
		errno = syscall.ESTALE
	}
	return es, p, errno
}

// owns reports whether upper entry st is the file n stands for.
func (n *node) owns(st *syscall.Stat_t) bool {
	sa := n.StableAttr()
	ino := n.r.inoFor(st, n.lower)
	return ino == sa.Ino && sa.Gen == n.r.gens.current(ino)
}

// attr fills a from state es of n, at path p.
func (n *node) attr(p string, es *entryState, a *fuse.Attr) {
	if es.up && es.st.Mode&syscall.S_IFMT == syscall.S_IFREG && n.r.region != nil {
		if size, ok := n.r.cowSize(n.r.upperPath(p), &es.st); ok {
			cowAttr(&es.st, size, n.StableAttr().Ino, a)
			return
		}
	}
	if es.up {
		upperAttr(&es.st, n.StableAttr().Ino, a)
		if es.lower != nil {
			a.Nlink = 1 // merged dir: subdir count unknown (as overlayfs)
		}
		return
	}
	n.r.lowerAttr(es.lower, a)
}

func (r *rootFS) newNode(parent *fs.Inode, ctx context.Context, es *entryState, lower *layout.Node) *fs.Inode {
	var sa fs.StableAttr
	if es.up {
		ino := r.inoFor(&es.st, lower)
		sa = fs.StableAttr{Mode: es.st.Mode & syscall.S_IFMT, Ino: ino, Gen: r.gens.current(ino)}
	} else {
		sa = fs.StableAttr{Mode: typeBits(es.lower.Entry.Type), Ino: es.lower.Ino}
	}
	nn := &node{r: r, lower: lower}
	ch := parent.NewInode(ctx, nn, sa)
	r.gens.made(ch, nn)
	return ch
}

func (n *node) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	n.r.mu.RLock()
	defer n.r.mu.RUnlock()
	d, dp, errno := n.state()
	if errno != 0 {
		return nil, errno
	}
	c, errno := n.r.child(&d, dp, name)
	if errno != 0 {
		return nil, errno
	}
	if !c.exists() {
		return nil, syscall.ENOENT
	}
	var lower *layout.Node
	if d.lower != nil && !c.opaque {
		// An opaque dir (made anew over a removed image dir) is another
		// directory, as for Mkdir and the listing: with the image dir's
		// number it would get the removed dir's node, which the kernel
		// still holds while anything has it open, and which is dead
		// (every create in it ENOENT).
		lower = d.lower.Children[name]
	}
	ch := n.r.newNode(n.EmbeddedInode(), ctx, &c, lower)
	chn := ch.Operations().(*node)
	chn.attr(join(dp, name), &c, &out.Attr)
	out.Attr.Ino = ch.StableAttr().Ino
	return ch, 0
}

func (n *node) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	if n.refreshWant.Load() {
		n.refreshWant.Store(false)
	}
	if fh, ok := f.(*fileHandle); ok && fh.up {
		return fh.Getattr(ctx, out)
	}
	if ch, ok := f.(*cowHandle); ok {
		return ch.Getattr(ctx, out)
	}
	// state is ESTALE for a node without a name too (one path walk).
	n.r.mu.RLock()
	defer n.r.mu.RUnlock()
	es, p, errno := n.state()
	if errno == syscall.ESTALE {
		return n.orphanAttr(out)
	}
	if errno != 0 {
		return errno
	}
	n.attr(p, &es, &out.Attr)
	return 0
}

func (n *node) Readlink(ctx context.Context) ([]byte, syscall.Errno) {
	n.r.mu.RLock()
	defer n.r.mu.RUnlock()
	es, p, errno := n.state()
	if errno != 0 {
		return nil, errno
	}
	if es.up {
		buf := make([]byte, 4096)
		k, err := unix.Readlink(n.r.upperPath(p), buf)
		if err != nil {
			return nil, toErrno(err)
		}
		return buf[:k], 0
	}
	if es.lower.Entry.Type != layout.TypeSymlink {
		return nil, syscall.EINVAL
	}
	return []byte(es.lower.Entry.Linkname), 0
}

// internalXattr hides the overlay format's own attributes from the container.
func internalXattr(name string) bool {
	return strings.HasPrefix(name, "trusted.overlay.") || strings.HasPrefix(name, "trusted.dupsnap.")
}

func (n *node) Getxattr(ctx context.Context, attr string, dest []byte) (uint32, syscall.Errno) {
	if internalXattr(attr) {
		return 0, syscall.ENODATA
	}
	n.r.mu.RLock()
	defer n.r.mu.RUnlock()
	es, p, errno := n.state()
	if errno != 0 {
		return 0, errno
	}
	if es.up {
		sz, err := unix.Lgetxattr(n.r.upperPath(p), attr, dest)
		return uint32(sz), toErrno(err)
	}
	v, ok := es.lower.Entry.Xattrs[attr]
	if !ok {
		return 0, syscall.ENODATA
	}
	if len(dest) < len(v) {
		return uint32(len(v)), syscall.ERANGE
	}
	return uint32(copy(dest, v)), 0
}

func (n *node) Listxattr(ctx context.Context, dest []byte) (uint32, syscall.Errno) {
	n.r.mu.RLock()
	defer n.r.mu.RUnlock()
	es, p, errno := n.state()
	if errno != 0 {
		return 0, errno
	}
	var names []string
	if es.up {
		buf := make([]byte, 64<<10)
		sz, err := unix.Llistxattr(n.r.upperPath(p), buf)
		if err != nil {
			return 0, toErrno(err)
		}
		for _, s := range strings.Split(string(buf[:sz]), "\x00") {
			if s != "" && !internalXattr(s) {
				names = append(names, s)
			}
		}
	} else {
		for k := range es.lower.Entry.Xattrs {
			names = append(names, k)
		}
	}
	var b []byte
	for _, s := range names {
		b = append(b, s...)
		b = append(b, 0)
	}
	if len(dest) < len(b) {
		return uint32(len(b)), syscall.ERANGE
	}
	return uint32(copy(dest, b)), 0
}

func (n *node) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	if n.r.region != nil {
		s, err := n.r.region.Statfs()
		if err != nil {
			return toErrno(err)
		}
		out.Bsize, out.Frsize = s.BlockSize, s.BlockSize
		out.Blocks, out.Bfree, out.Bavail = s.Blocks, s.Free, s.Free
		out.NameLen = 255
		var st syscall.Statfs_t
		if syscall.Statfs(n.r.statfs, &st) == nil {
			out.Files, out.Ffree = st.Files, st.Ffree
		}
		return 0
	}
	var st syscall.Statfs_t
	if err := syscall.Statfs(n.r.statfs, &st); err != nil {
		return toErrno(err)
	}
	out.FromStatfsT(&st)
	return 0
}
