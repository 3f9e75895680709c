package stack

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// TopDir makes the one directory a run keeps everything under (parent
// default /var/tmp: short socket paths, and not /tmp, where the rest of the
// machine churns inodes). It records our pid so that a later run can
// remove what a SIGKILLed run left (processes, mounts, files): that is
// what makes running twice in a row work even after `kill -9`.
func TopDir(parent, prefix string) (string, error) {
	if parent == "" {
		parent = "/var/tmp"
	}
	ReapStale(parent, prefix)
	dir, err := os.MkdirTemp(parent, prefix+"-")
	if err != nil {
		return "", fmt.Errorf("temp dir under %s: %w", parent, err)
	}
	if err := os.WriteFile(filepath.Join(dir, "owner.pid"), []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
		return "", err
	}
	return dir, nil
}

// ReapStale cleans parent/prefix-* dirs whose owner process is gone.
func ReapStale(parent, prefix string) {
	ms, _ := filepath.Glob(filepath.Join(parent, prefix+"-*"))
	for _, d := range ms {
		b, err := os.ReadFile(filepath.Join(d, "owner.pid"))
		if err != nil {
			continue // not ours, or still being created
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || pid == os.Getpid() {
			continue
		}
		if syscall.Kill(pid, 0) == nil {
			continue // its owner still runs
		}
		fmt.Fprintf(os.Stderr, "removing %s left by an earlier run (pid %d)\n", d, pid)
		if err := Emergency(d); err != nil {
			fmt.Fprintf(os.Stderr, "  could not clean %s: %v (unmount it by hand)\n", d, err)
		}
	}
}
