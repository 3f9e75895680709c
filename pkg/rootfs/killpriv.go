package rootfs

import (
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

// killSuidgid clears setuid, and setgid if group-executable, of node
// nodeID (what the VFS does on a write by a caller without CAP_FSETID;
// Linux's FUSE keeps setgid without group execute) and drops the kernel's
// cached attributes of it.
func (c *countedFS) killSuidgid(cancel <-chan struct{}, h *fuse.InHeader, nodeID uint64) {
	gin := fuse.GetAttrIn{InHeader: *h}
	gin.NodeId = nodeID
	var out fuse.AttrOut
	if !c.RawFileSystem.GetAttr(cancel, &gin, &out).Ok() || out.Mode&syscall.S_IFMT != syscall.S_IFREG {
		return
	}
	mode := out.Mode &^ syscall.S_ISUID
	if mode&(syscall.S_ISGID|syscall.S_IXGRP) == syscall.S_ISGID|syscall.S_IXGRP {
		mode &^= syscall.S_ISGID
	}
	if mode == out.Mode {
		return
	}
	var sin fuse.SetAttrIn
	sin.InHeader = *h
	sin.NodeId = nodeID
	sin.Valid = fuse.FATTR_MODE
	sin.Mode = mode
	c.RawFileSystem.SetAttr(cancel, &sin, &out)
	if c.r != nil && c.r.srv != nil {
		// Offset -1: attributes only, no page cache and no inode lock (the
		// kernel may hold it for this very request).
		c.r.srv.InodeNotify(nodeID, -1, 0)
	}
}
