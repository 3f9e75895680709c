package snapshotter

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// stopTimeout bounds how long a stopping server may take to exit after its
// unmount before its connection is aborted and it is killed.
const stopTimeout = 10 * time.Second

// stopServer unmounts the rootfs at mountpoint and waits for its server to
// exit; a stuck one has its FUSE connection aborted and is killed.
//
// The abort goes through a handle on the connection's fusectl dir opened
// while the mount is still there. FUSE connections are named by the minor
// of an anonymous device that the kernel hands to the next new mount as soon
// as this one is gone: aborting "/sys/fs/fuse/connections/<minor>" after the
// unmount may abort somebody else's fresh rootfs ("transport endpoint is not
// connected" in a running container). A handle to a removed fusectl dir
// resolves nothing, so a late abort through it hits no one.
func stopServer(ctx context.Context, mountpoint string) error {
	pid := serverPid(mountpoint)
	conn := openConnDir(mountpoint)
	if conn != nil {
		defer conn.Close()
	}
	for i := 0; i < 3 && isMountpoint(mountpoint); i++ {
		err := unix.Unmount(mountpoint, 0)
		if errors.Is(err, unix.EBUSY) {
			// Still in use (a container's bind mount): detach; the server
			// exits when the last user goes.
			err = unix.Unmount(mountpoint, unix.MNT_DETACH)
		}
		if err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("unmount %s: %w", mountpoint, err)
		}
	}
	if pid != 0 && !waitGone(ctx, pid, stopTimeout) {
		log.G(ctx).WithField("pid", pid).WithField("mountpoint", mountpoint).Warn("rootfs server did not exit, aborting its connection")
		if conn != nil {
			abortConnDir(conn)
		}
		_ = unix.Kill(pid, unix.SIGKILL)
		waitGone(ctx, pid, 2*time.Second)
	}
	os.Remove(filepath.Join(filepath.Dir(mountpoint), "rootfs.pid"))
	return nil
}

// serverPid is the live `dupsnap rootfs` process serving mountpoint, or 0.
// Pids are reused: one named by a pidfile is only trusted if it is a rootfs
// server that is not a zombie.
func serverPid(mountpoint string) int {
	b, err := os.ReadFile(filepath.Join(filepath.Dir(mountpoint), "rootfs.pid"))
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	if !isRootfsServer(pid) {
		return 0
	}
	return pid
}

func isRootfsServer(pid int) bool {
	if pid <= 0 {
		return false
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	args := strings.Split(string(b), "\x00")
	if len(args) < 2 || args[1] != "rootfs" {
		return false
	}
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(st, ')')
	return !(i > 0 && i+2 < len(st) && st[i+2] == 'Z')
}

// waitGone polls until pid is no rootfs server any more (exited, reaped or
// zombie), for at most d.
func waitGone(ctx context.Context, pid int, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for isRootfsServer(pid) {
		if time.Now().After(deadline) || ctx.Err() != nil {
			return !isRootfsServer(pid)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return true
}

// isMountpoint reports whether something is mounted exactly at mp.
func isMountpoint(mp string) bool {
	_, _, ok := mountAt(mp)
	return ok
}

// mountAt returns the fstype and device minor of the topmost mount at mp,
// from mountinfo (never touching the mount: a dead server would hang a stat).
func mountAt(mp string) (fstype string, minor int, ok bool) {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return "", 0, false
	}
	mp = filepath.Clean(mp)
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 10 || unescapeMountinfo(f[4]) != mp {
			continue
		}
		sep := 6
		for sep < len(f) && f[sep] != "-" {
			sep++
		}
		if sep+1 >= len(f) {
			continue
		}
		var major, mnr int
		if _, err := fmt.Sscanf(f[2], "%d:%d", &major, &mnr); err != nil {
			continue
		}
		fstype, minor, ok = f[sep+1], mnr, true // later lines are on top
	}
	return fstype, minor, ok
}

// openConnDir opens the fusectl dir of the FUSE connection mounted at mp
// (nil if none or fusectl is not mounted).
func openConnDir(mp string) *os.File {
	fstype, minor, ok := mountAt(mp)
	if !ok || !strings.HasPrefix(fstype, "fuse") {
		return nil
	}
	f, err := os.Open(fmt.Sprintf("/sys/fs/fuse/connections/%d", minor))
	if err != nil {
		return nil
	}
	// Re-check: the mount may have gone (and the minor been reused)
	// between reading mountinfo and opening the dir.
	if _, m2, ok := mountAt(mp); !ok || m2 != minor {
		f.Close()
		return nil
	}
	return f
}

func abortConnDir(dir *os.File) {
	fd, err := unix.Openat(int(dir.Fd()), "abort", unix.O_WRONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return // connection already gone
	}
	defer unix.Close(fd)
	_, _ = unix.Write(fd, []byte("1"))
}
