package rootfs

import (
	"bufio"
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/dupsnap/dupsnap/pkg/layout"
)

// createCow creates the placeholder of a new region file at up (in dir
// d, which is in upper) and finishes the Create. Creating many small
// files is dominated by per-file syscalls, so everything goes through the
// new descriptor (no path lookups), owner and mode are set only when the
// create did not already give the right ones, and the descriptor stays
// open as the placeholder handle. Caller holds r.mu (write).
func (n *node) createCow(ctx context.Context, d *entryState, up string, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	perm := mode & 07777
	var (
		fd      int
		ref     cowRef
		curPerm uint32 // the permission bits the new inode has
		pooled  bool
		pe      phEntry
	)
	// A pooled inode was made in the upper root: it would miss the
	// default POSIX ACL the host fs gives a file created in a dir that
	// has one (as overlayfs's upper does), so such dirs create in place.
	var (
		e  phEntry
		ok bool
	)
	if !hasDefaultACL(filepath.Dir(up)) {
		e, ok = n.r.takePlaceholder()
	}
	if ok {
		// Inode made ahead (phpool.go): naming it is all the host fs does.
		err := unix.Linkat(e.fd, "", unix.AT_FDCWD, up, unix.AT_EMPTY_PATH)
		switch {
		case err == nil:
			fd, ref, curPerm, pooled, pe = e.fd, e.ref, e.perm, true, e
			n.r.cowMu.Lock()
			n.r.fresh[ref.id] = struct{}{}
			n.r.cowMu.Unlock()
		case err == unix.EEXIST:
			n.r.putBackPlaceholder(e)
			return nil, nil, 0, syscall.EEXIST
		default:
			// e.g. ENOENT/EPERM: linking by descriptor not allowed here;
			// create in place below, and stop pooling.
			dropPlaceholder(e)
			n.r.stopPlaceholders()
		}
	}
	if !pooled {
		// open(2) applies the server's umask and may drop special bits:
		// ask for the final mode at once when it survives, else fchmod.
		curPerm = 0o600
		if perm&^0o777 == 0 && perm&serverUmask() == 0 {
			curPerm = perm
		}
		var err error
		fd, err = unix.Open(up, unix.O_RDWR|unix.O_CREAT|unix.O_EXCL|unix.O_CLOEXEC|unix.O_NOFOLLOW, curPerm)
		if err != nil {
			return nil, nil, 0, toErrno(err)
		}
	}
	// os.NewFile, not os.OpenFile: a regular file is no netpoller fd, and
	// OpenFile's attempt to register it costs a failing epoll_ctl.
	f := os.NewFile(uintptr(fd), up)
	fail := func(err error) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
		f.Close()
		os.Remove(up)
		return nil, nil, 0, toErrno(err)
	}
	if !pooled {
		var err error
		if ref, err = n.r.markCow(f, &layout.Entry{}); err != nil {
			return fail(err)
		}
	}
	if c, ok := ctx.(*fuse.Context); ok {
		// An inode created in place has the server's ids, or the dir's
		// group under a setgid dir, as the host fs does it.
		uid, gid := int(c.Uid), int(c.Gid)
		hostUid, hostGid := os.Geteuid(), os.Getegid()
		if !d.up { // prepDir just copied the dir up
			syscall.Lstat(dirOfAbs(up), &d.st)
		}
		if d.st.Mode&syscall.S_ISGID != 0 {
			gid, hostGid = int(d.st.Gid), int(d.st.Gid)
		}
		if pooled {
			hostUid, hostGid = pe.uid, pe.gid
		}
		if uid != hostUid || gid != hostGid {
			// Before any chmod: chown clears setuid/setgid bits.
			if err := unix.Fchown(fd, uid, gid); err != nil {
				return fail(err)
			}
		}
	}
	if curPerm != perm {
		if err := unix.Fchmod(fd, perm); err != nil {
			return fail(err)
		}
	}
	if pooled {
		futimensNow(fd) // made a while ago; ctime moved with the link
	}
	var st syscall.Stat_t
	if err := syscall.Fstat(fd, &st); err != nil {
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

// serverUmask is this process's umask, read without changing it (umask(2)
// would, for a moment, for every thread).
var serverUmask = sync.OnceValue(func() uint32 {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return 0o777 // unknown: always fchmod
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "Umask:"); ok {
			if m, err := strconv.ParseUint(strings.TrimSpace(v), 8, 32); err == nil {
				return uint32(m)
			}
		}
	}
	return 0o777
})

// hasDefaultACL reports whether dir carries a default POSIX ACL.
func hasDefaultACL(dir string) bool {
	sz, err := unix.Getxattr(dir, "system.posix_acl_default", nil)
	return err == nil && sz > 0
}
