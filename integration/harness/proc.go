// Package harness starts real components for dupsnap's integration tests,
// `make demo` and `make bench`: a private containerd (never the system
// one), `dupsnap serve`, a registry, test images built from files on this
// machine with real duplication, and ctr commands with deadlines. Every
// process, mount and file it makes is cleaned up by t.Cleanup.
package harness

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// RepoRoot is the directory holding go.mod (found upward from the cwd).
func RepoRoot() string {
	dir, _ := os.Getwd()
	for d := dir; d != "/"; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d
		}
	}
	return dir
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

// ToolsDir holds containerd, ctr, containerd-shim-runc-v2 and registry
// ($DUPSNAP_TOOLS, default <repo>/_tools/bin).
func ToolsDir() string { return envOr("DUPSNAP_TOOLS", filepath.Join(RepoRoot(), "_tools", "bin")) }

// DupsnapBin is bin/dupsnap ($DUPSNAP_BIN).
func DupsnapBin() string { return envOr("DUPSNAP_BIN", filepath.Join(RepoRoot(), "bin", "dupsnap")) }

// DupproxyBin is bin/dupproxy ($DUPPROXY_BIN).
func DupproxyBin() string { return envOr("DUPPROXY_BIN", filepath.Join(RepoRoot(), "bin", "dupproxy")) }

// Require skips the test unless running as root with the named files present.
func Require(t testing.TB, files ...string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (mounts, FUSE, containerd)")
	}
	for _, f := range files {
		if _, err := os.Stat(f); err != nil {
			t.Skipf("%s missing (run `make build tools`): %v", f, err)
		}
	}
}

// Proc is a started subprocess with its own log file and process group.
type Proc struct {
	Name    string
	Cmd     *exec.Cmd
	LogFile string
	done    chan struct{}
	err     error
}

// StartProc starts bin with args; output goes to logFile (never to the
// test's stdout). The process is killed in t.Cleanup if still running.
func StartProc(t testing.TB, name, logFile string, env []string, bin string, args ...string) *Proc {
	t.Helper()
	p, err := startProc(name, logFile, env, bin, args...)
	if err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	t.Cleanup(func() { p.Kill() })
	return p
}

func startProc(name, logFile string, env []string, bin string, args ...string) (*Proc, error) {
	return startProcFiles(name, logFile, env, nil, bin, args...)
}

// startProcFiles is startProc passing files as fds 3, 4, ... of the child.
func startProcFiles(name, logFile string, env []string, files []*os.File, bin string, args ...string) (*Proc, error) {
	lf, err := os.OpenFile(logFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.Env = append(os.Environ(), env...)
	cmd.ExtraFiles = files
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		lf.Close()
		return nil, err
	}
	p := &Proc{Name: name, Cmd: cmd, LogFile: logFile, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		lf.Close()
		close(p.done)
	}()
	return p, nil
}

// Exited reports whether the process has ended.
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Kill sends SIGKILL to the process (not its group: rootfs servers and
// shims are meant to survive their parent) and waits for it.
func (p *Proc) Kill() {
	if p == nil || p.Exited() {
		return
	}
	_ = p.Cmd.Process.Signal(syscall.SIGKILL)
	<-p.done
}

// Stop sends SIGTERM and waits up to timeout, then kills.
func (p *Proc) Stop(timeout time.Duration) error {
	if p.Exited() {
		return p.err
	}
	_ = p.Cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return p.err
	case <-time.After(timeout):
		p.Kill()
		return fmt.Errorf("%s did not stop within %s", p.Name, timeout)
	}
}

// Tail is the end of the process log.
func (p *Proc) Tail() string { return LogTail(p.LogFile, 40) }

// LogTail returns the last n lines of a file.
func LogTail(file string, n int) string {
	b, err := os.ReadFile(file)
	if err != nil {
		return fmt.Sprintf("(no log %s: %v)", file, err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return fmt.Sprintf("--- tail of %s (%d bytes) ---\n%s\n---", file, len(b), strings.Join(lines, "\n"))
}

// Run runs a command to completion with a deadline, returning combined output.
func Run(ctx context.Context, timeout time.Duration, env []string, bin string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = append(os.Environ(), env...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.WaitDelay = 5 * time.Second
	err := cmd.Run()
	if ctx.Err() != nil {
		err = fmt.Errorf("%s %s: %w (after %s)", filepath.Base(bin), strings.Join(args, " "), ctx.Err(), timeout)
	} else if err != nil {
		err = fmt.Errorf("%s %s: %w\n%s", filepath.Base(bin), strings.Join(args, " "), err, out.String())
	}
	return out.String(), err
}

// MountsUnder lists mountpoints at or below dir, deepest first.
func MountsUnder(dir string) []string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 5 {
			continue
		}
		mp := strings.ReplaceAll(fs[4], `\040`, " ")
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			out = append([]string{mp}, out...)
		}
	}
	return out
}

// UnmountUnder unmounts everything below dir. A FUSE mount whose server
// hangs is aborted through /sys/fs/fuse/connections so nothing blocks.
func UnmountUnder(dir string) error {
	var errs []error
	for i := 0; i < 3; i++ {
		mps := MountsUnder(dir)
		if len(mps) == 0 {
			return nil
		}
		for _, mp := range mps {
			if err := unix.Unmount(mp, 0); err == nil {
				continue
			}
			abortFuse(mp)
			if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
				errs = append(errs, fmt.Errorf("unmount %s: %w", mp, err))
			}
		}
	}
	if mps := MountsUnder(dir); len(mps) > 0 {
		return fmt.Errorf("still mounted: %v %v", mps, errors.Join(errs...))
	}
	return nil
}

// abortFuse aborts the FUSE connection of mountpoint mp, if it is FUSE.
func abortFuse(mp string) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 10 || strings.ReplaceAll(fs[4], `\040`, " ") != mp {
			continue
		}
		sep := 6
		for sep < len(fs) && fs[sep] != "-" {
			sep++
		}
		if sep+1 >= len(fs) || !strings.HasPrefix(fs[sep+1], "fuse") {
			return
		}
		// fs[2] is major:minor; the fuse connection is named by the minor.
		if mm := strings.SplitN(fs[2], ":", 2); len(mm) == 2 {
			_ = os.WriteFile(filepath.Join("/sys/fs/fuse/connections", mm[1], "abort"), []byte("1"), 0o200)
		}
	}
}

// PidsMentioning lists processes (not this one) whose command line contains s.
func PidsMentioning(s string) []int {
	des, _ := os.ReadDir("/proc")
	var pids []int
	self := os.Getpid()
	for _, de := range des {
		pid, err := strconv.Atoi(de.Name())
		if err != nil || pid == self {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", de.Name(), "cmdline"))
		if err != nil {
			continue
		}
		if bytes.Contains(b, []byte(s)) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// KillMentioning SIGKILLs every process whose command line contains s
// (rootfs servers and shims started for one test dir) and waits a moment
// for them to go.
func KillMentioning(s string) {
	pids := PidsMentioning(s)
	for _, pid := range pids {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(pids) > 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
		pids = PidsMentioning(s)
	}
}

// CleanupDir tears down everything a test made under dir: processes
// mentioning it, then its mounts (deepest first).
func CleanupDir(t testing.TB, dir string) {
	if err := UnmountUnder(dir); err != nil {
		t.Errorf("cleanup: %v", err)
	}
	KillMentioning(dir)
	if err := UnmountUnder(dir); err != nil {
		t.Errorf("cleanup: %v", err)
	}
	ReapOrphans()
}

// TempDir is a fresh directory under /tmp that is torn down (processes,
// mounts, files) in t.Cleanup. Short paths keep unix sockets under 108 bytes.
func TempDir(t testing.TB, prefix string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		CleanupDir(t, dir)
		if len(MountsUnder(dir)) == 0 {
			os.RemoveAll(dir)
		}
	})
	return dir
}
