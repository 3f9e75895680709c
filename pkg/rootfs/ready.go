package rootfs

import (
	"context"
	"errors"
	"io"
	"os"
	"strconv"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/dupsnap/dupsnap/internal/phases"
)

// Start learns that its server is ready through a pipe: the server inherits
// the write end (readyFDEnv names its fd) and writes one byte once the
// mount is up and go-fuse's poll hack is done; if the server dies first,
// Start reads EOF at once. Polling mountinfo cost a 10 ms tick per start
// and said "mounted" before the server could serve.

// readyFDEnv names the inherited fd of the ready pipe in the server;
// spawnedEnv carries when Start spawned it (UnixNano), so that the server's
// log shows what exec and process start cost.
const (
	readyFDEnv = "DUPSNAP_ROOTFS_READY_FD"
	spawnedEnv = "DUPSNAP_ROOTFS_SPAWNED"
)

// freeOSMemoryDelay: the server returns its load-time garbage to the OS
// after the container has started, not while it starts (2 cores).
const freeOSMemoryDelay = 2 * time.Second

// readyPipe is the server's end (nil: not started by Start). signal may
// come from the mount watch's goroutine (earlyready.go).
type readyPipe struct {
	mu sync.Mutex
	f  *os.File
}

// takeReadyPipe adopts the inherited ready fd, once per process.
func takeReadyPipe() *readyPipe {
	v := os.Getenv(readyFDEnv)
	if v == "" {
		return nil
	}
	os.Unsetenv(readyFDEnv)
	fd, err := strconv.Atoi(v)
	if err != nil || fd < 3 {
		return nil
	}
	// Only a pipe: never write into whatever else the fd might be.
	var st unix.Stat_t
	if unix.Fstat(fd, &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFIFO {
		return nil
	}
	unix.CloseOnExec(fd)
	return &readyPipe{f: os.NewFile(uintptr(fd), "ready")}
}

func (p *readyPipe) signal() {
	if p == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.f == nil {
		return
	}
	p.f.Write([]byte{1})
	p.f.Close()
	p.f = nil
}

func (p *readyPipe) Close() {
	if p == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.f == nil {
		return
	}
	p.f.Close()
	p.f = nil
}

// errServerExited: the ready pipe hit EOF without the ready byte.
var errServerExited = errors.New("server exited")

// waitReady waits for the server's byte on r (the read end). The server's
// exit (EOF) or ctx end is an error. A server that does not know the pipe
// (an older binary) is seen through mountinfo, checked every fallbackTick.
func waitReady(ctx context.Context, r *os.File, mountpoint string) error {
	got := make(chan error, 1)
	go func() {
		var b [1]byte
		_, err := r.Read(b[:])
		if err == io.EOF {
			err = errServerExited
		}
		got <- err
	}()
	defer r.Close() // unblocks the reader
	const fallbackTick = 100 * time.Millisecond
	tick := time.NewTicker(fallbackTick)
	defer tick.Stop()
	for {
		select {
		case err := <-got:
			return err
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
			if Mounted(mountpoint) {
				// Give a pipe-aware server the moment it needs for the
				// poll hack; an old one never writes.
				select {
				case err := <-got:
					return err
				case <-time.After(fallbackTick):
					return nil
				}
			}
		}
	}
}

// waitExit waits until pid is no live rootfs server, for at most d or ctx:
// on a pidfd when the kernel has them (no polling delay), else by polling.
func waitExit(ctx context.Context, pid int, d time.Duration) bool {
	deadline := time.Now().Add(d)
	if fd, err := unix.PidfdOpen(pid, 0); err == nil {
		defer unix.Close(fd)
		// The pid may have been reused before the pidfd was opened.
		for ourProcess(pid) {
			left := time.Until(deadline)
			if dl, ok := ctx.Deadline(); ok && time.Until(dl) < left {
				left = time.Until(dl)
			}
			if left <= 0 || ctx.Err() != nil {
				return !ourProcess(pid)
			}
			// Short slices so that a cancelled ctx is seen soon.
			ms := int(min(left, 100*time.Millisecond) / time.Millisecond)
			fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
			n, err := unix.Poll(fds, max(ms, 1))
			if err != nil && !errors.Is(err, syscall.EINTR) {
				break // fall back to polling below
			}
			if n > 0 {
				// Exited; it may stay a zombie until its parent reaps it,
				// which ourProcess counts as gone.
				return true
			}
		}
		if !ourProcess(pid) {
			return true
		}
	}
	for ourProcess(pid) {
		if time.Now().After(deadline) || ctx.Err() != nil {
			return !ourProcess(pid)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return true
}

// newPhases starts timing a server's start (logged with "serving"); the
// first phase is the time since Start spawned this process ("exec") or
// handed it to a spare ("handoff"), if it did.
func newPhases() *phases.Timer {
	start := time.Now()
	first := ""
	if !assignedAt.IsZero() {
		// From the spare's read of its assignment; the wakeup before it
		// is logged as "wake".
		start, first = assignReadAt, "handoff"
	} else if v := os.Getenv(spawnedEnv); v != "" {
		os.Unsetenv(spawnedEnv)
		if ns, err := strconv.ParseInt(v, 10, 64); err == nil {
			start, first = time.Unix(0, ns), "exec"
		}
	}
	ph := phases.Start(start)
	if first != "" {
		ph.Mark(first)
	}
	return ph
}
