package rootfs

import (
	"os"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fuse"
)

// Kill-privileges v2 (fuse.CAP_HANDLE_KILLPRIV_V2, set in mountOptions).
//
// Why: without it the kernel asks for security.capability before every
// write to a non-passthrough file (a GETXATTR round trip per WRITE: half
// the requests of random 4 KiB writes into a region file, and one of the
// five round trips of a small new file). With it the superblock is
// SB_NOSEC, so the kernel checks once per inode; it still removes
// security.capability itself (REMOVEXATTR, as before), but leaves setuid
// and setgid to the server, flagging the requests of callers without
// CAP_FSETID: a WRITE with WRITE_KILL_SUIDGID, a SETATTR with
// FATTR_KILL_SUIDGID (truncate), an OPEN or CREATE with OPEN_KILL_SUIDGID
// (O_TRUNC). TestKillPrivOnWrite compares the result with the host fs.
//
// A passthrough write sends no request at all, and the kernel writes the
// backing file with the server's credentials (which keep the bits), so a
// writable open of a privileged upper file is not passthrough (upperHandle).
// Left as is: bits set by a chmod while a passthrough handle is open for
// writing survive that handle's later writes.

// killSuidgid clears setuid, and setgid if group-executable, of node
// nodeID (what the VFS does on a write by a caller without CAP_FSETID;
// Linux's FUSE keeps setgid without group execute) and drops the kernel's
// cached attributes of it. It returns the node's attributes after that
// (ok: they could be read), for a reply that carries them.
func (c *countedFS) killSuidgid(cancel <-chan struct{}, h *fuse.InHeader, nodeID uint64) (fuse.Attr, bool) {
	gin := fuse.GetAttrIn{InHeader: *h}
	gin.NodeId = nodeID
	var out fuse.AttrOut
	if !c.RawFileSystem.GetAttr(cancel, &gin, &out).Ok() {
		return fuse.Attr{}, false
	}
	if out.Mode&syscall.S_IFMT != syscall.S_IFREG || !privileged(out.Mode) {
		return out.Attr, true
	}
	mode := out.Mode &^ syscall.S_ISUID
	if mode&(syscall.S_ISGID|syscall.S_IXGRP) == syscall.S_ISGID|syscall.S_IXGRP {
		mode &^= syscall.S_ISGID
	}
	var sin fuse.SetAttrIn
	sin.InHeader = *h
	sin.NodeId = nodeID
	sin.Valid = fuse.FATTR_MODE
	sin.Mode = mode
	before := out.Attr
	if !c.RawFileSystem.SetAttr(cancel, &sin, &out).Ok() {
		return before, true
	}
	if c.r != nil && c.r.srv != nil {
		// Offset -1: attributes only, no page cache and no inode lock (the
		// kernel may hold it for this very request).
		c.r.srv.InodeNotify(nodeID, -1, 0)
	}
	return out.Attr, true
}

// privileged reports whether a write by a caller without CAP_FSETID would
// have to clear bits of mode.
func privileged(mode uint32) bool {
	return mode&syscall.S_ISUID != 0 || mode&(syscall.S_ISGID|syscall.S_IXGRP) == syscall.S_ISGID|syscall.S_IXGRP
}

// upperHandle is the handle of an open of plain upper file d (open flags
// flags): passthrough, unless it is a writable open of a privileged file,
// whose writes then come as WRITE requests (direct I/O: such an open may
// share the inode with passthrough ones, a cached one may not).
func upperHandle(d *os.File, ino uint64, flags uint32) (*fileHandle, uint32) {
	h := &fileHandle{data: d, up: true, ino: ino}
	if !writeIntent(flags) {
		return h, 0
	}
	if fi, err := d.Stat(); err == nil {
		if st, ok := fi.Sys().(*syscall.Stat_t); ok && privileged(st.Mode) {
			h.noPT = true
			return h, fuse.FOPEN_DIRECT_IO
		}
	}
	return h, 0
}
