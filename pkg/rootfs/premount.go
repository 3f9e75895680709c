package rootfs

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/dupsnap/dupsnap/pkg/layout"
)

// Premount: a spare that preloaded its expected chain also mounts it
// ahead, detached (fsopen/fsmount: a mount in no namespace, its INIT
// answered), so that its assignment only attaches that mount at the
// mountpoint (move_mount). The mount(2), the INIT round trip and the wait
// for the mount to show in mountinfo (1.1-1.9 ms of a container's start
// on a busy node) are then off the start. Nothing can reach a detached
// mount, so no request arrives before the assignment has put the
// container's rootFS under the root node.

// premount is a spare's detached FUSE mount of its preloaded tree.
type premount struct {
	mntFd  int // fsmount's fd: the mount, until attached
	server *fuse.Server
	root   *node
	raw    *countedFS
	st     *opStats
	debug  bool // mountOptions(cfg) depend on Debug and ReadOnly only
}

// premountTree mounts tree (already fixRoot'ed) detached, as a writable
// rootfs with cfg.Debug's options.
func premountTree(tree *layout.Tree, debug bool) (_ *premount, err error) {
	opts := mountOptions(Config{Debug: debug})
	// The /dev/fd/N form below: go-fuse serves an fd mounted by us.
	opts.DirectMount, opts.DirectMountStrict = false, false
	dev, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open /dev/fuse: %w", err)
	}
	fsfd, mnt := -1, -1
	defer func() {
		if fsfd >= 0 {
			unix.Close(fsfd)
		}
		if err != nil {
			if mnt >= 0 {
				unix.Close(mnt)
			}
			unix.Close(dev)
		}
	}()
	if fsfd, err = unix.Fsopen("fuse", unix.FSOPEN_CLOEXEC); err != nil {
		return nil, fmt.Errorf("fsopen fuse: %w", err)
	}
	// What go-fuse's mountDirect passes to mount(2) for mountOptions.
	for _, kv := range [][2]string{
		{"source", opts.FsName}, {"subtype", opts.Name}, {"fd", strconv.Itoa(dev)},
		{"rootmode", strconv.FormatUint(syscall.S_IFDIR, 8)},
		{"user_id", strconv.Itoa(os.Geteuid())}, {"group_id", strconv.Itoa(os.Getegid())},
		{"max_read", strconv.Itoa(opts.MaxWrite)},
	} {
		if err = unix.FsconfigSetString(fsfd, kv[0], kv[1]); err != nil {
			return nil, fmt.Errorf("fsconfig %s: %w", kv[0], err)
		}
	}
	for _, f := range []string{"default_permissions", "allow_other"} {
		if err = unix.FsconfigSetFlag(fsfd, f); err != nil {
			return nil, fmt.Errorf("fsconfig %s: %w", f, err)
		}
	}
	if err = unix.FsconfigCreate(fsfd); err != nil { // sends INIT
		return nil, fmt.Errorf("fsconfig create: %w", err)
	}
	if mnt, err = unix.Fsmount(fsfd, unix.FSMOUNT_CLOEXEC, 0); err != nil {
		return nil, fmt.Errorf("fsmount: %w", err)
	}
	pm := &premount{mntFd: mnt, root: &node{lower: tree.Root}, st: newOpStats(), debug: debug}
	pm.raw = &countedFS{RawFileSystem: fs.NewNodeFS(pm.root, opts), st: pm.st}
	// NewServer answers the INIT queued above; go-fuse owns dev from here.
	if pm.server, err = fuse.NewServer(pm.raw, "/dev/fd/"+strconv.Itoa(dev), &opts.MountOptions); err != nil {
		return nil, fmt.Errorf("fuse server: %w", err)
	}
	go pm.server.Serve()
	return pm, nil
}

// fits reports whether the premount can serve cfg.
func (pm *premount) fits(cfg Config) bool {
	return pm != nil && !cfg.ReadOnly && cfg.Debug == pm.debug
}

// attach puts r under the root node and the mount at mountpoint.
func (pm *premount) attach(r *rootFS, mountpoint string) error {
	pm.root.r, pm.raw.r, r.srv = r, r, pm.server
	if err := unix.MoveMount(pm.mntFd, "", unix.AT_FDCWD, mountpoint, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return fmt.Errorf("move_mount to %s: %w", mountpoint, err)
	}
	unix.Close(pm.mntFd)
	pm.mntFd = -1
	return nil
}

// discard drops an unattached premount: its last reference gone, the
// mount ends and so does its server.
func (pm *premount) discard() {
	if pm == nil || pm.mntFd < 0 {
		return
	}
	// The unmount forgets the root node (OnForget): a rootFS of nothing,
	// also in place of one whose attach failed (it is mounted anew).
	pm.root.r = newRootFS(&layout.Tree{Root: &layout.Node{}}, nil, Config{ReadOnly: true}, nil)
	unix.Close(pm.mntFd)
	pm.mntFd = -1
	done := make(chan struct{})
	go func() { pm.server.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(2 * time.Second): // the process exits soon anyway
	}
}

// pollHack is go-fuse's WaitMount poll hack for a mount it does not know
// the path of: the kernel learns that POLL is not implemented before
// this process opens a file of the mount through Go's netpoller (see the
// epoll note in serve.go).
func pollHack(mountpoint string) error {
	fd, err := unix.Open(mountpoint+"/.go-fuse-epoll-hack", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN | unix.POLLPRI | unix.POLLOUT}}, 0)
	return unix.Close(fd)
}

// unmountServer unmounts server's mount at mountpoint (premounted: go-fuse
// knows only its /dev/fd path).
func unmountServer(server *fuse.Server, mountpoint string, premounted bool) error {
	if !premounted {
		return server.Unmount()
	}
	err := unix.Unmount(mountpoint, 0)
	if errors.Is(err, unix.EINVAL) {
		return nil
	}
	return err
}
