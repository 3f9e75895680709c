package rootfs

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/dupsnap/dupsnap/internal/phases"
)

// mountEntry is one line of /proc/self/mountinfo.
type mountEntry struct {
	id           uint64
	major, minor int
	fstype       string
}

// unescape undoes mountinfo's octal escapes (\040 for space, ...).
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// findMount returns the topmost mount at mountpoint. It reads mountinfo and
// never touches the mount itself (a stuck FUSE server would hang a stat).
func findMount(mountpoint string) (mountEntry, bool) {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return mountEntry{}, false
	}
	return topMount(bytes.NewReader(data), filepath.Clean(mountpoint), "")
}

// topMount scans mountinfo text for the topmost mount at mp (clean) of
// type fstype ("": any type).
func topMount(r io.Reader, mp, fstype string) (mountEntry, bool) {
	var found mountEntry
	ok := false
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 10 || unescape(f[4]) != mp {
			continue
		}
		sep := 6
		for sep < len(f) && f[sep] != "-" {
			sep++
		}
		if sep+1 >= len(f) || fstype != "" && f[sep+1] != fstype {
			continue
		}
		var e mountEntry
		if _, err := fmt.Sscanf(f[0], "%d", &e.id); err != nil {
			continue
		}
		if _, err := fmt.Sscanf(f[2], "%d:%d", &e.major, &e.minor); err != nil {
			continue
		}
		e.fstype = f[sep+1]
		found, ok = e, true // later lines are mounted on top
	}
	return found, ok
}

// Mounted reports whether a dupsnap FUSE fs is mounted at mountpoint.
func Mounted(mountpoint string) bool {
	e, ok := findMount(mountpoint)
	return ok && e.fstype == FSType
}

func readPid(mountpoint string) int {
	b, err := os.ReadFile(pidPath(mountpoint))
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return pid
}

// ourProcess reports whether pid is a live `dupsnap rootfs` process (pids
// are reused: never signal a process just because a pidfile names it).
func ourProcess(pid int) bool {
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
	if err == nil {
		if i := bytes.LastIndexByte(st, ')'); i > 0 && i+2 < len(st) && st[i+2] == 'Z' {
			return false // zombie: dead, not yet reaped
		}
	}
	return true
}

// Alive reports whether a live dupsnap rootfs is mounted at mountpoint.
func Alive(mountpoint string) bool {
	if !Mounted(mountpoint) {
		return false
	}
	if pid := readPid(mountpoint); pid != 0 {
		return ourProcess(pid)
	}
	return true // served in-process (no pidfile)
}

// Start writes cfg next to the mountpoint, spawns `<binary> rootfs --config
// FILE` detached from the caller, and returns once the mount is live.
func Start(ctx context.Context, binary string, cfg Config, logFile string) (int, error) {
	return start(ctx, binary, cfg, logFile, false)
}

// StartSpare is Start for a long-lived caller (the daemon): it hands cfg to
// a spare server started ahead when there is one (see spare.go), and
// starts the next spare once this server is ready.
func StartSpare(ctx context.Context, binary string, cfg Config, logFile string) (int, error) {
	return start(ctx, binary, cfg, logFile, true)
}

func start(ctx context.Context, binary string, cfg Config, logFile string, useSpare bool) (int, error) {
	if err := cfg.validate(); err != nil {
		return 0, err
	}
	ph := phases.Start(time.Now())
	cfgPath := ConfigPath(cfg.Mountpoint)
	if err := writeConfig(cfgPath, cfg); err != nil {
		return 0, err
	}
	ph.Mark("config")
	binary = ServerBinary(binary)
	// Only the small binary knows --spare.
	useSpare = useSpare && filepath.Base(binary) == SmallBinary
	var p *serverProc
	if useSpare {
		if p = takeSpare(binary); p != nil {
			if err := p.assignTo(cfgPath, logFile); err != nil {
				p.cmd.Process.Kill()
				p.ready.Close()
				p = nil
			}
		}
	}
	if p == nil {
		logf, err := os.OpenFile(logFile, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
		if err != nil {
			return 0, fmt.Errorf("rootfs: log file: %w", err)
		}
		p, err = spawn(binary, cfgPath, "", logf, spawnedEnv+"="+strconv.FormatInt(time.Now().UnixNano(), 10))
		logf.Close()
		if err != nil {
			return 0, err
		}
	}
	ph.Mark("handoff")
	defer p.ready.Close()
	pid := p.cmd.Process.Pid
	fail := func(err error) (int, error) {
		p.cmd.Process.Kill()
		select {
		case <-p.exited:
		case <-time.After(5 * time.Second):
		}
		os.Remove(pidPath(cfg.Mountpoint))
		return 0, fmt.Errorf("rootfs: start %s: %w; log: %s", cfg.Mountpoint, err, logTail(logFile))
	}
	if err := os.WriteFile(pidPath(cfg.Mountpoint), []byte(strconv.Itoa(pid)+"\n"), 0o600); err != nil {
		return fail(err)
	}
	ph.Mark("pidfile")
	if err := waitReady(ctx, p.ready, cfg.Mountpoint); err != nil {
		if errors.Is(err, errServerExited) {
			// It closes the pipe as Serve returns, before it logs why.
			select {
			case <-p.exited:
			case <-time.After(2 * time.Second):
			}
		}
		return fail(err)
	}
	ph.Mark("ready")
	log.G(ctx).WithField("mountpoint", cfg.Mountpoint).WithField("phases", ph.String()).Debug("rootfs: started")
	if useSpare {
		// SCHED_IDLE (prio.go): the spare's exec and preload must not
		// compete with the container that is starting on this rootfs.
		InIdle(func() { refillSpare(binary, cfg) })
	}
	return pid, nil
}

// SmallBinary is the dedicated rootfs server (cmd/dupsnap-rootfs): same
// server, a fraction of dupsnap's code pages in every container's RSS.
const SmallBinary = "dupsnap-rootfs"

// ServerBinary is what Start runs for binary (dupsnap): SmallBinary from
// the same dir if it is there, else binary itself (`dupsnap rootfs`).
func ServerBinary(binary string) string {
	small := filepath.Join(filepath.Dir(binary), SmallBinary)
	if fi, err := os.Stat(small); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
		return small
	}
	return binary
}

func logTail(path string) string {
	b, _ := os.ReadFile(path)
	if len(b) > 2048 {
		b = b[len(b)-2048:]
	}
	return strings.TrimSpace(string(b))
}

// stopTimeout bounds the wait for a server to exit after its unmount when
// the caller's ctx has no deadline.
const stopTimeout = 10 * time.Second

// Stop unmounts mountpoint, waits up to ctx (at most stopTimeout) for the
// server to exit, and only if it is stuck aborts its FUSE connection (see
// conn.go: through a handle opened while the mount exists) and kills it.
func Stop(ctx context.Context, mountpoint string) error { return stop(ctx, mountpoint, false) }

// Discard is Stop for a rootfs whose state is deleted next (Remove,
// Commit): once the mount is gone, the server is killed instead of left to
// sync its region and publish its last stats, which nobody will read.
// Busy mounts are only detached, as in Stop, and the server waited for.
func Discard(ctx context.Context, mountpoint string) error { return stop(ctx, mountpoint, true) }

func stop(ctx context.Context, mountpoint string, discard bool) error {
	wait, err := stopBegin(ctx, mountpoint, discard)
	if err != nil {
		return err
	}
	wait(ctx)
	return nil
}

// DiscardBegin is the first half of Discard: the mount is gone (or
// detached, if busy) and the server killed when it returns; wait is the
// rest (the server's exit, or aborting a stuck one, and its pidfile),
// which a caller with nothing left to do on that mount runs in the
// background. Until wait returned, the server may still hold its state.
func DiscardBegin(ctx context.Context, mountpoint string) (wait func(context.Context), err error) {
	return stopBegin(ctx, mountpoint, true)
}

func stopBegin(ctx context.Context, mountpoint string, discard bool) (func(context.Context), error) {
	ph := phases.Start(time.Now())
	pid := readPid(mountpoint)
	if pid != 0 && !ourProcess(pid) {
		pid = 0
	}
	ph.Mark("pid")
	conn := openConn(mountpoint)
	ph.Mark("conn")
	closeConn := func() {
		if conn != nil {
			conn.Close()
		}
	}
	detached := false
	pins := []int{}
	for i := 0; i < 3 && Mounted(mountpoint); i++ {
		var err error
		if discard {
			var pin int
			var busy bool
			pin, busy, err = detachPinned(mountpoint)
			detached = detached || busy
			if pin >= 0 {
				pins = append(pins, pin)
			}
		} else {
			err = syscall.Unmount(mountpoint, 0)
			if errors.Is(err, syscall.EBUSY) {
				// Still in use (a container's bind mount): detach; the
				// server exits when the last user goes.
				err = syscall.Unmount(mountpoint, syscall.MNT_DETACH)
				detached = true
			}
		}
		if err != nil && !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.ENOENT) {
			closeConn()
			for _, fd := range pins {
				unix.Close(fd)
			}
			return nil, fmt.Errorf("rootfs: unmount %s: %w", mountpoint, err)
		}
	}
	ph.Mark("umount")
	log.G(ctx).WithField("mountpoint", mountpoint).WithField("phases", ph.String()).Debug("rootfs: unmounted")
	return func(ctx context.Context) {
		defer closeConn()
		// Discarded: nobody waits for its last syncs. (A kill of a
		// multi-threaded process took 1-3 ms: done here, not above.)
		if discard && !detached && pid != 0 && ourProcess(pid) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		// The last reference: the unmount's teardown runs here.
		for _, fd := range pins {
			unix.Close(fd)
		}
		if pid != 0 && !waitExit(ctx, pid, stopTimeout) {
			log.G(ctx).WithField("pid", pid).WithField("mountpoint", mountpoint).Warn("rootfs: server did not exit, aborting its connection")
			abortConn(conn)
			syscall.Kill(pid, syscall.SIGKILL)
			waitExit(context.Background(), pid, 2*time.Second)
		}
		os.Remove(pidPath(mountpoint))
	}, nil
}

// detachPinned takes the mount at mountpoint out of the namespace at once
// and leaves its teardown to whoever closes pin (-1: nothing pinned). A
// plain umount(2) of a rootfs did it all in the caller, which took 2-40 ms
// (100 ms seen) on a busy node: an expedited RCU grace period, and
// dropping the FUSE inodes' cached pages. MNT_DETACH does not wait for
// the grace period, and with the O_PATH reference held the final
// teardown happens at the close of pin, off the caller's path.
//
// busy says the mount was in use (open files, cwd): a probe with
// MNT_EXPIRE (EBUSY if in use; else EAGAIN, and only an expiry mark that
// any use clears) tells it without unmounting. A busy mount is detached
// unpinned, as Stop does: its server exits when the last user goes.
func detachPinned(mountpoint string) (pin int, busy bool, err error) {
	busy = errors.Is(unix.Unmount(mountpoint, unix.MNT_EXPIRE), unix.EBUSY)
	pin = -1
	if !busy {
		if fd, err := unix.Open(mountpoint, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0); err == nil {
			pin = fd
		}
	}
	if err := unix.Unmount(mountpoint, unix.MNT_DETACH); err != nil {
		if pin >= 0 {
			unix.Close(pin)
		}
		return -1, busy, err
	}
	return pin, busy, nil
}
