package rootfs

import (
	"context"
	"errors"
	"os"
	"sync/atomic"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/dupsnap/dupsnap/pkg/layout"
)

// Reflink copy-up (opt-in): the first write to an image file clones its
// CAS object into the upper file (FICLONE: shared extents, no data copied;
// the filesystem then copies only the blocks a write touches) and the file
// stays a plain upper file served with passthrough: its reads and writes
// no longer go through the daemon, and its page cache is the host
// filesystem's, which may hold large folios. A region file's merged bytes
// sit in the FUSE inode's page cache, which Linux 6.18 keeps at 4 KiB
// folios whatever the mount options (fuse_init_file_inode sets no folio
// order): a warm sequential read of it runs at about half the speed of the
// same bytes in 1 MiB ext4 folios.
//
// Needs the CAS and the upper dir on one filesystem with reflink (xfs,
// btrfs); anywhere else (ext4) the first attempt fails and every later
// copy-up takes the region path. Like Config.PlainNewFiles, such files'
// writes bypass the region and are not counted by Usage; so a snapshot
// with a MaxSize cap never clones (the cap must hold).
//
// The switch is Config.ReflinkCopyUp ([rootfs] reflink_copy_up), or the
// environment of the rootfs server (DUPSNAP_REFLINK_COPYUP=1, for tests).
const reflinkEnv = "DUPSNAP_REFLINK_COPYUP"

type reflinker struct {
	on  atomic.Bool // enabled (env, or enableReflinkCopyUp)
	off atomic.Bool // the filesystem said no once: stop trying
}

var reflinkSwitch = func() *reflinker {
	rl := &reflinker{}
	rl.on.Store(os.Getenv(reflinkEnv) == "1")
	return rl
}()

// enableReflinkCopyUp turns reflink copy-up on for this process (one
// server serves one rootfs).
func enableReflinkCopyUp(on bool) { reflinkSwitch.on.Store(on) }

// reflinkUp tries to give dst, a new empty upper file, the content of
// image file e by cloning its CAS object. false: dst is unchanged and the
// caller makes it a region file.
func (r *rootFS) reflinkUp(ctx context.Context, dst *os.File, e *layout.Entry) bool {
	if e.Size == 0 || !reflinkSwitch.on.Load() || reflinkSwitch.off.Load() || r.cas == nil {
		return false
	}
	if r.region != nil && r.region.Stats().MaxSize > 0 {
		return false
	}
	src, err := r.cas.OpenFile(e.Digest)
	if err != nil {
		log.G(ctx).WithError(err).Warnf("rootfs: reflink copy-up of %s: open object", e.Path)
		return false
	}
	defer src.Close()
	err = unix.IoctlFileClone(int(dst.Fd()), int(src.Fd()))
	if err == nil {
		return true
	}
	// A failed clone leaves the destination as it was, but be sure: the
	// region path wants an empty placeholder.
	if terr := dst.Truncate(0); terr != nil {
		log.G(ctx).WithError(terr).Warnf("rootfs: reflink copy-up of %s: truncate after failed clone", e.Path)
	}
	if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EXDEV) || errors.Is(err, unix.EINVAL) ||
		errors.Is(err, unix.ENOTTY) || errors.Is(err, unix.ENOSYS) {
		if !reflinkSwitch.off.Swap(true) {
			log.G(ctx).WithError(err).Infof("rootfs: no reflink between the CAS and the upper dir: modified files use the region")
		}
		return false
	}
	log.G(ctx).WithError(err).Warnf("rootfs: reflink copy-up of %s", e.Path)
	return false
}
