package harness

import (
	"bytes"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Rootfs servers and shims outlive their parent on purpose (a killed
// dupsnap or containerd must not take containers down). When a test kills
// that parent they are re-parented to init, and an init that does not reap
// (PID 1 of a CI container often does not) collects them as zombies for
// the rest of the machine's life. So every process using the harness is a
// child subreaper: such orphans become its children and reapOrphans waits
// for them once they exit.
func init() {
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return
	}
	go func() {
		for range time.Tick(500 * time.Millisecond) {
			ReapOrphans()
		}
	}()
}

// ReapOrphans waits for exited processes this process adopted as subreaper:
// zombie children that are session leaders (rootfs servers, shims) named
// dupsnap or containerd-shim*. Children this process started itself run in
// their own process group but not their own session (startProc, Run), and
// their exec.Cmd reaps them; they are never touched here.
func ReapOrphans() int {
	self := os.Getpid()
	des, err := os.ReadDir("/proc")
	if err != nil {
		return 0
	}
	n := 0
	for _, de := range des {
		pid, err := strconv.Atoi(de.Name())
		if err != nil {
			continue
		}
		st, err := os.ReadFile("/proc/" + de.Name() + "/stat")
		if err != nil {
			continue
		}
		// pid (comm) state ppid pgrp session ...
		open, close := bytes.IndexByte(st, '('), bytes.LastIndexByte(st, ')')
		if open < 0 || close < open || close+2 >= len(st) {
			continue
		}
		comm := string(st[open+1 : close])
		f := strings.Fields(string(st[close+2:]))
		if len(f) < 4 || f[0] != "Z" {
			continue
		}
		ppid, _ := strconv.Atoi(f[1])
		sid, _ := strconv.Atoi(f[3])
		if ppid != self || sid != pid || !(comm == "dupsnap" || strings.HasPrefix(comm, "containerd-shim")) {
			continue
		}
		var ws unix.WaitStatus
		if wpid, err := unix.Wait4(pid, &ws, unix.WNOHANG, nil); err == nil && wpid == pid {
			n++
		}
	}
	return n
}
