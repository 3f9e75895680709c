package rootfs

import (
	"context"
	"os"
	"syscall"

	"github.com/containerd/log"
	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/dupsnap/dupsnap/pkg/layout"
)

var (
	_ = (fs.NodeCreater)((*node)(nil))
	_ = (fs.NodeMkdirer)((*node)(nil))
	_ = (fs.NodeMknoder)((*node)(nil))
	_ = (fs.NodeSymlinker)((*node)(nil))
	_ = (fs.NodeLinker)((*node)(nil))
	_ = (fs.NodeUnlinker)((*node)(nil))
	_ = (fs.NodeRmdirer)((*node)(nil))
	_ = (fs.NodeRenamer)((*node)(nil))
	_ = (fs.NodeSetattrer)((*node)(nil))
	_ = (fs.NodeSetxattrer)((*node)(nil))
	_ = (fs.NodeRemovexattrer)((*node)(nil))
	_ = (fs.NodeFsyncer)((*node)(nil))
)

func logErr(ctx context.Context, op, p string, err error) {
	log.G(ctx).WithError(err).WithField("path", p).Warnf("rootfs: %s failed", op)
}

// prepDir is the common start of every namespace change in directory n:
// the write lock, the dir's state, and its upper dir.
func (n *node) prepDir(ctx context.Context) (entryState, string, syscall.Errno) {
	if n.r.readOnly || n.r.upper == "" {
		return entryState{}, "", syscall.EROFS
	}
	d, dp, errno := n.state()
	if errno != 0 {
		return d, dp, errno
	}
	if d.up {
		return d, dp, 0 // the dir is in upper already (state just lstat'ed it)
	}
	if err := n.r.ensureUpperDir(ctx, dp); err != nil {
		logErr(ctx, "copy-up dir", dp, err)
		return d, dp, toErrno(err)
	}
	return d, dp, 0
}

// owner gives a new upper entry the caller's ids (the server runs as root),
// and the dir's group under a setgid dir.
func owner(ctx context.Context, parentUpper, p string) error {
	c, ok := ctx.(*fuse.Context)
	if !ok {
		return nil
	}
	uid, gid := int(c.Uid), int(c.Gid)
	var st syscall.Stat_t
	if err := syscall.Lstat(parentUpper, &st); err == nil && st.Mode&syscall.S_ISGID != 0 {
		gid = int(st.Gid)
	}
	return os.Lchown(p, uid, gid)
}

// created finishes a create: ids, mode, opaque dir if it replaces a hidden
// image dir, and the new inode.
func (n *node) created(ctx context.Context, d *entryState, dp, name string, mode uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	p := join(dp, name)
	up := n.r.upperPath(p)
	if err := owner(ctx, n.r.upperPath(dp), up); err != nil {
		os.Remove(up)
		return nil, toErrno(err)
	}
	var st syscall.Stat_t
	if err := syscall.Lstat(up, &st); err != nil {
		return nil, toErrno(err)
	}
	if st.Mode&syscall.S_IFMT != syscall.S_IFLNK {
		// Explicit chmod: the server's umask must not apply twice.
		if err := syscall.Chmod(up, mode&07777); err != nil {
			return nil, toErrno(err)
		}
	}
	if st.Mode&syscall.S_IFMT == syscall.S_IFDIR && lowerBelow(d, d.lower, name) {
		if err := setOpaque(up); err != nil {
			return nil, toErrno(err)
		}
	}
	if err := syscall.Lstat(up, &st); err != nil {
		return nil, toErrno(err)
	}
	delete(n.r.copyup, st.Ino) // a reused st_ino is a new inode
	es := entryState{up: true, st: st}
	ch := n.r.newUpperInode(ctx, n.EmbeddedInode(), st.Mode, st.Ino)
	upperAttr(&st, ch.StableAttr().Ino, &out.Attr)
	_ = es
	return ch, 0
}

// prepName readies name in dir d for a new entry: EEXIST if taken, and a
// whiteout on it removed.
func (n *node) prepName(d *entryState, dp, name string) syscall.Errno {
	c, errno := n.r.child(d, dp, name)
	if errno != 0 {
		return errno
	}
	if c.exists() {
		return syscall.EEXIST
	}
	if !c.wh {
		return 0 // child's lstat saw no whiteout there
	}
	if _, err := n.r.removeWhiteout(join(dp, name)); err != nil {
		return toErrno(err)
	}
	return 0
}

func (n *node) Create(ctx context.Context, name string, flags, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	n.r.mu.Lock()
	defer n.r.mu.Unlock()
	d, dp, errno := n.prepDir(ctx)
	if errno != 0 {
		return nil, nil, 0, errno
	}
	if errno := n.prepName(&d, dp, name); errno != 0 {
		return nil, nil, 0, errno
	}
	up := n.r.upperPath(join(dp, name))
	if n.r.region != nil && !n.r.plainNew {
		return n.createCow(ctx, &d, up, mode, out)
	}
	f, err := os.OpenFile(up, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, nil, 0, toErrno(err)
	}
	f.Close()
	ch, errno := n.created(ctx, &d, dp, name, mode, out)
	if errno != 0 {
		os.Remove(up)
		return nil, nil, 0, errno
	}
	data, err := os.OpenFile(up, os.O_RDWR, 0)
	if err != nil {
		return nil, nil, 0, toErrno(err)
	}
	h, fl := upperHandle(data, ch.StableAttr().Ino, flags|syscall.O_RDWR)
	return ch, h, fl, 0
}

func (n *node) Mkdir(ctx context.Context, name string, mode uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	n.r.mu.Lock()
	defer n.r.mu.Unlock()
	d, dp, errno := n.prepDir(ctx)
	if errno != 0 {
		return nil, errno
	}
	if errno := n.prepName(&d, dp, name); errno != 0 {
		return nil, errno
	}
	if err := os.Mkdir(n.r.upperPath(join(dp, name)), 0o700); err != nil {
		return nil, toErrno(err)
	}
	return n.created(ctx, &d, dp, name, mode, out)
}

func (n *node) Mknod(ctx context.Context, name string, mode, dev uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	n.r.mu.Lock()
	defer n.r.mu.Unlock()
	d, dp, errno := n.prepDir(ctx)
	if errno != 0 {
		return nil, errno
	}
	if errno := n.prepName(&d, dp, name); errno != 0 {
		return nil, errno
	}
	if err := unix.Mknod(n.r.upperPath(join(dp, name)), mode&syscall.S_IFMT|0o600, int(dev)); err != nil {
		return nil, toErrno(err)
	}
	return n.created(ctx, &d, dp, name, mode, out)
}

func (n *node) Symlink(ctx context.Context, target, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	n.r.mu.Lock()
	defer n.r.mu.Unlock()
	d, dp, errno := n.prepDir(ctx)
	if errno != 0 {
		return nil, errno
	}
	if errno := n.prepName(&d, dp, name); errno != 0 {
		return nil, errno
	}
	if err := os.Symlink(target, n.r.upperPath(join(dp, name))); err != nil {
		return nil, toErrno(err)
	}
	return n.created(ctx, &d, dp, name, 0, out)
}

func (n *node) Link(ctx context.Context, target fs.InodeEmbedder, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	t, ok := target.(*node)
	if !ok {
		return nil, syscall.EXDEV
	}
	n.r.mu.Lock()
	defer n.r.mu.Unlock()
	d, dp, errno := n.prepDir(ctx)
	if errno != 0 {
		return nil, errno
	}
	ts, tp, errno := t.state()
	if errno != 0 {
		return nil, errno
	}
	if !ts.up {
		if err := n.r.copyUp(ctx, tp, ts.lower); err != nil {
			logErr(ctx, "copy-up", tp, err)
			return nil, toErrno(err)
		}
	}
	if errno := n.prepName(&d, dp, name); errno != 0 {
		return nil, errno
	}
	up := n.r.upperPath(join(dp, name))
	if err := os.Link(n.r.upperPath(tp), up); err != nil {
		return nil, toErrno(err)
	}
	var st syscall.Stat_t
	if err := syscall.Lstat(up, &st); err != nil {
		return nil, toErrno(err)
	}
	ino := t.StableAttr().Ino
	if size, ok := n.r.cowSize(up, &st); ok && n.r.region != nil {
		cowAttr(&st, size, ino, &out.Attr)
	} else {
		upperAttr(&st, ino, &out.Attr)
	}
	return n.NewInode(ctx, &node{r: n.r, lower: t.lower}, t.StableAttr()), 0
}

// remove is unlink and rmdir: drop the upper entry, and hide the image
// entry below with a whiteout.
func (n *node) remove(ctx context.Context, name string, dir bool) syscall.Errno {
	n.r.mu.Lock()
	defer n.r.mu.Unlock()
	d, dp, errno := n.prepDir(ctx)
	if errno != 0 {
		return errno
	}
	p := join(dp, name)
	c, errno := n.r.child(&d, dp, name)
	if errno != 0 {
		return errno
	}
	if !c.exists() {
		return syscall.ENOENT
	}
	if dir != c.isDir() {
		if dir {
			return syscall.ENOTDIR
		}
		return syscall.EISDIR
	}
	if dir {
		if errno := n.r.mustBeEmpty(&c, p); errno != 0 {
			return errno
		}
	}
	if c.up {
		ref, isCow := n.r.cowRefOf(&c, p)
		var err error
		if dir {
			err = os.RemoveAll(n.r.upperPath(p)) // holds whiteouts at most
		} else {
			err = os.Remove(n.r.upperPath(p))
		}
		if err != nil {
			return toErrno(err)
		}
		if c.st.Nlink <= 1 || dir {
			delete(n.r.copyup, c.st.Ino)
		}
		if isCow && c.st.Nlink <= 1 {
			n.r.dropped(ref)
		}
	}
	if lowerBelow(&d, d.lower, name) {
		if err := n.r.whiteout(ctx, p); err != nil {
			return toErrno(err)
		}
	}
	return 0
}

func (n *node) Unlink(ctx context.Context, name string) syscall.Errno {
	return n.remove(ctx, name, false)
}
func (n *node) Rmdir(ctx context.Context, name string) syscall.Errno {
	return n.remove(ctx, name, true)
}

func (n *node) Rename(ctx context.Context, name string, newParent fs.InodeEmbedder, newName string, flags uint32) syscall.Errno {
	np, ok := newParent.(*node)
	if !ok {
		return syscall.EXDEV
	}
	if flags&^uint32(unix.RENAME_NOREPLACE) != 0 {
		return syscall.EINVAL // RENAME_EXCHANGE / WHITEOUT: not supported
	}
	n.r.mu.Lock()
	defer n.r.mu.Unlock()
	sd, sdp, errno := n.prepDir(ctx)
	if errno != 0 {
		return errno
	}
	dd, ddp, errno := np.prepDir(ctx)
	if errno != 0 {
		return errno
	}
	sp, dp := join(sdp, name), join(ddp, newName)
	src, errno := n.r.child(&sd, sdp, name)
	if errno != 0 {
		return errno
	}
	if !src.exists() {
		return syscall.ENOENT
	}
	dst, errno := n.r.child(&dd, ddp, newName)
	if errno != 0 {
		return errno
	}
	if sp == dp {
		return 0
	}
	if dst.exists() {
		if flags&unix.RENAME_NOREPLACE != 0 {
			return syscall.EEXIST
		}
		if sameInode(&src, &dst) {
			return 0 // rename(2): two links to one inode, nothing happens
		}
		if src.isDir() != dst.isDir() {
			if src.isDir() {
				return syscall.ENOTDIR
			}
			return syscall.EISDIR
		}
		if dst.isDir() {
			if errno := n.r.mustBeEmpty(&dst, dp); errno != 0 {
				return errno
			}
			if dst.up {
				if err := os.RemoveAll(n.r.upperPath(dp)); err != nil {
					return toErrno(err)
				}
			}
		}
	}
	// Make the source independent of its image path.
	if src.isDir() {
		if src.lower != nil {
			if err := n.r.materialize(ctx, sp, src.lower, map[*layout.Node]string{}); err != nil {
				logErr(ctx, "materialize dir", sp, err)
				return toErrno(err)
			}
		}
	} else if !src.up {
		if err := n.r.copyUp(ctx, sp, src.lower); err != nil {
			logErr(ctx, "copy-up", sp, err)
			return toErrno(err)
		}
	}
	if _, err := n.r.removeWhiteout(dp); err != nil {
		return toErrno(err)
	}
	var dref cowRef
	dropDst := false
	if dst.up && !dst.isDir() && dst.st.Nlink <= 1 {
		dref, dropDst = n.r.cowRefOf(&dst, dp)
	}
	if dropDst {
		n.r.pinVictim(np.GetChild(newName), n.r.upperPath(dp))
	}
	if err := os.Rename(n.r.upperPath(sp), n.r.upperPath(dp)); err != nil {
		return toErrno(err)
	}
	if dropDst {
		n.r.dropped(dref)
	}
	if src.isDir() && lowerBelow(&dd, dd.lower, newName) && !isOpaque(n.r.upperPath(dp)) {
		if err := setOpaque(n.r.upperPath(dp)); err != nil {
			return toErrno(err)
		}
	}
	if lowerBelow(&sd, sd.lower, name) {
		if err := n.r.whiteout(ctx, sp); err != nil {
			return toErrno(err)
		}
	}
	return 0
}

func sameInode(a, b *entryState) bool {
	if a.up && b.up {
		return a.st.Ino == b.st.Ino && a.st.Dev == b.st.Dev
	}
	return !a.up && !b.up && a.lower == b.lower
}

// prepWrite copies n up (if it is a clean image entry) for a change of its
// data or metadata, and returns its upper path. Caller holds r.mu.
func (n *node) prepWrite(ctx context.Context) (string, syscall.Errno) {
	if n.r.readOnly || n.r.upper == "" {
		return "", syscall.EROFS
	}
	es, p, errno := n.state()
	if errno != 0 {
		return "", errno
	}
	if !es.up {
		if err := n.r.copyUp(ctx, p, es.lower); err != nil {
			logErr(ctx, "copy-up", p, err)
			return "", toErrno(err)
		}
	} else if es.isDir() {
		if err := n.r.ensureUpperDir(ctx, p); err != nil {
			return "", toErrno(err)
		}
	}
	return n.r.upperPath(p), 0
}

func (n *node) Setattr(ctx context.Context, f fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	n.r.mu.Lock()
	defer n.r.mu.Unlock()
	es, p, errno := n.state()
	if errno != 0 {
		return errno
	}
	var up string
	if es.isDir() && !es.up {
		if n.r.readOnly || n.r.upper == "" {
			return syscall.EROFS
		}
		if err := n.r.ensureUpperDir(ctx, p); err != nil {
			return toErrno(err)
		}
		up = n.r.upperPath(p)
	} else if up, errno = n.prepWrite(ctx); errno != 0 {
		return errno
	}
	uid, uok := in.GetUID()
	gid, gok := in.GetGID()
	if uok || gok {
		su, sg := -1, -1
		if uok {
			su = int(uid)
		}
		if gok {
			sg = int(gid)
		}
		if err := os.Lchown(up, su, sg); err != nil {
			return toErrno(err)
		}
	}
	if m, ok := in.GetMode(); ok {
		if err := syscall.Chmod(up, m&07777); err != nil {
			return toErrno(err)
		}
	}
	if sz, ok := in.GetSize(); ok {
		var err error
		if _, isCow := readCowRef(up); isCow && n.r.region != nil {
			err = n.r.truncateCow(up, int64(sz))
		} else if fh, ok := f.(*fileHandle); ok && fh.data != nil {
			err = fh.data.Truncate(int64(sz))
		} else {
			err = os.Truncate(up, int64(sz))
		}
		if err != nil {
			return toErrno(err)
		}
	}
	mt, mok := in.GetMTime()
	at, aok := in.GetATime()
	if mok || aok {
		ts := []unix.Timespec{{Nsec: unix.UTIME_OMIT}, {Nsec: unix.UTIME_OMIT}}
		if aok {
			ts[0], _ = unix.TimeToTimespec(at)
		}
		if mok {
			ts[1], _ = unix.TimeToTimespec(mt)
		}
		if err := unix.UtimesNanoAt(unix.AT_FDCWD, up, ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return toErrno(err)
		}
	}
	es, p, errno = n.state()
	if errno != 0 {
		return errno
	}
	n.attr(p, &es, &out.Attr)
	return 0
}

func (n *node) Setxattr(ctx context.Context, attr string, data []byte, flags uint32) syscall.Errno {
	if internalXattr(attr) {
		return syscall.EPERM
	}
	n.r.mu.Lock()
	defer n.r.mu.Unlock()
	up, errno := n.prepWriteAny(ctx)
	if errno != 0 {
		return errno
	}
	return toErrno(unix.Lsetxattr(up, attr, data, int(flags)))
}

func (n *node) Removexattr(ctx context.Context, attr string) syscall.Errno {
	if internalXattr(attr) {
		return syscall.ENODATA
	}
	n.r.mu.Lock()
	defer n.r.mu.Unlock()
	up, errno := n.prepWriteAny(ctx)
	if errno != 0 {
		return errno
	}
	return toErrno(unix.Lremovexattr(up, attr))
}

// prepWriteAny is prepWrite for files and dirs alike.
func (n *node) prepWriteAny(ctx context.Context) (string, syscall.Errno) {
	es, p, errno := n.state()
	if errno != 0 {
		return "", errno
	}
	if es.isDir() {
		if n.r.readOnly || n.r.upper == "" {
			return "", syscall.EROFS
		}
		if err := n.r.ensureUpperDir(ctx, p); err != nil {
			return "", toErrno(err)
		}
		return n.r.upperPath(p), 0
	}
	return n.prepWrite(ctx)
}

// Fsync without a handle (fsync on a dir, or by the kernel): sync the dir.
func (n *node) Fsync(ctx context.Context, f fs.FileHandle, flags uint32) syscall.Errno {
	switch fh := f.(type) {
	case *fileHandle:
		return fh.Fsync(ctx, flags)
	case *cowHandle:
		return fh.Fsync(ctx, flags)
	}
	return 0
}
