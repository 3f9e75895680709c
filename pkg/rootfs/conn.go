package rootfs

import (
	"fmt"
	"os"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// FUSE connections are named in fusectl by the minor of an anonymous
// device, and the kernel hands that minor to the next new mount as soon as
// this one is gone: writing "/sys/fs/fuse/connections/<minor>/abort" after
// an unmount may abort somebody else's fresh rootfs. So a connection is
// only ever aborted through a handle on its fusectl dir, opened while the
// mount is still there and verified against mountinfo afterwards. A handle
// on a removed fusectl dir resolves nothing: a late abort hits no one.

const fusectlDir = "/sys/fs/fuse/connections"

// ensureFusectl mounts fusectl if it is not (containers, minimal hosts).
func ensureFusectl() {
	if _, err := os.Stat(fusectlDir); err != nil {
		return
	}
	var st syscall.Statfs_t
	if syscall.Statfs(fusectlDir, &st) == nil && st.Type != 0x65735543 {
		syscall.Mount("fusectl", fusectlDir, "fusectl", 0, "")
	}
}

// openConn opens the fusectl dir of the FUSE connection mounted at
// mountpoint; nil if there is none (or fusectl is unavailable).
func openConn(mountpoint string) *os.File {
	e, ok := findMount(mountpoint)
	if !ok || !strings.HasPrefix(e.fstype, "fuse") {
		return nil
	}
	ensureFusectl()
	f, err := os.Open(fmt.Sprintf("%s/%d", fusectlDir, e.minor))
	if err != nil {
		return nil
	}
	// The mount may have gone (and its minor been reused) between reading
	// mountinfo and opening the dir.
	if e2, ok := findMount(mountpoint); !ok || e2.minor != e.minor || e2.major != e.major {
		f.Close()
		return nil
	}
	return f
}

// abortConn aborts the connection whose fusectl dir is open as dir: every
// request fails at once and nothing waits on the server any more. A no-op
// once that connection is gone.
func abortConn(dir *os.File) {
	if dir == nil {
		return
	}
	fd, err := unix.Openat(int(dir.Fd()), "abort", unix.O_WRONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return
	}
	defer unix.Close(fd)
	_, _ = unix.Write(fd, []byte("1"))
}
