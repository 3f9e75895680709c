package rootfs

import (
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// Early ready: Start's caller only needs the mount to exist. Other
// processes may use a FUSE mount from the moment mount(2) returns (their
// requests wait for the server's INIT); only this process must wait for
// go-fuse's WaitMount (see the epoll note in serve.go). WaitMount's INIT
// and poll-hack round trips cost a start 0.5-1.5 ms on a loaded node, so
// the ready pipe is signalled as soon as /proc/self/mountinfo shows the
// new mount, while those round trips go on beside containerd's next steps.

// mountWatch waits for a new dupsnap mount at a mountpoint.
type mountWatch struct {
	info   *os.File
	stop   int // eventfd
	before uint64
	done   chan struct{}
}

// watchMount calls fn (in another goroutine) once a dupsnap mount other
// than the one there now (if any) is at mountpoint. The watch ends at
// the first of that or stop(); stop returns after fn has returned if fn
// was called. A watch that cannot be set up calls nothing.
func watchMount(mountpoint string, fn func()) (stop func()) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return func() {}
	}
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		f.Close()
		return func() {}
	}
	w := &mountWatch{info: f, stop: efd, done: make(chan struct{})}
	mp := filepath.Clean(mountpoint)
	w.before, _ = dupsnapMountID(f, mp)
	go func() {
		defer close(w.done)
		for {
			fds := []unix.PollFd{{Fd: int32(f.Fd()), Events: unix.POLLPRI}, {Fd: int32(efd), Events: unix.POLLIN}}
			if _, err := unix.Poll(fds, -1); err != nil && err != unix.EINTR {
				return
			}
			if fds[1].Revents != 0 {
				return
			}
			if fds[0].Revents != 0 {
				if id, ok := dupsnapMountID(f, mp); ok && id != w.before {
					fn()
					return
				}
			}
		}
	}()
	return func() {
		unix.Write(efd, []byte{1, 0, 0, 0, 0, 0, 0, 0})
		<-w.done
		unix.Close(efd)
		f.Close()
	}
}

// dupsnapMountID rereads mountinfo from f (which also rearms its POLLPRI)
// and returns the mount ID of the topmost dupsnap mount at mp.
func dupsnapMountID(f *os.File, mp string) (id uint64, ok bool) {
	if _, err := f.Seek(0, 0); err != nil {
		return 0, false
	}
	e, ok := topMount(f, mp, FSType)
	return e.id, ok
}
