package integration

import (
	"bufio"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dupsnap/dupsnap/integration/harness"
)

// TestDemo runs `make demo`'s program with the smallest image set, twice in
// a row (the second run interrupted with SIGINT mid-pull, as Ctrl-C would),
// and checks that each leaves no mount, process or file behind.
func TestDemo(t *testing.T) {
	tools := harness.ToolsDir()
	harness.Require(t, harness.DupsnapBin(), harness.DupproxyBin(), filepath.Join(tools, "containerd"),
		filepath.Join(tools, "ctr"), filepath.Join(tools, "registry"), "/usr/sbin/runc")
	if testing.Short() {
		t.Skip("short mode")
	}
	if _, err := exec.LookPath("go"); err != nil {
		t.Skip("go not in PATH: cannot build the demo program")
	}
	parent := harness.TempDir(t, "demotest-")
	bin := filepath.Join(parent, "dupdemo")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if out, err := harness.Run(ctx, 2*time.Minute, []string{"CGO_ENABLED=0"}, "go", "build", "-o", bin, "./cmd/dupdemo"); err != nil {
		t.Fatalf("building dupdemo: %v\n%s", err, out)
	}
	// --timeout: the demo cleans up by itself even if this test is killed.
	args := []string{"--images", "2", "--image-mb", "6", "--dir", parent, "--logs", filepath.Join(parent, "logs"), "--timeout", "100s"}

	// Full run.
	out, err := harness.Run(ctx, 90*time.Second, nil, bin, args...)
	if err != nil {
		t.Fatalf("demo failed: %v\n%s", err, out)
	}
	for _, want := range []string{"disk: total", "bytes transferred", "pull time", "files verified"} {
		if !strings.Contains(out, want) {
			t.Errorf("demo output lacks %q:\n%s", want, out)
		}
	}
	assertNothingLeft(t, parent)
	if _, err := os.Stat(filepath.Join(parent, "logs")); err == nil {
		t.Errorf("a successful run kept its logs")
	}

	// Second run, interrupted while pulling.
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.WaitDelay = 5 * time.Second
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var lines []string
	sc := bufio.NewScanner(stdout)
	sent := false
	for sc.Scan() {
		lines = append(lines, sc.Text())
		if !sent && strings.Contains(sc.Text(), "pulled in") {
			cmd.Process.Signal(syscall.SIGINT)
			sent = true
		}
	}
	err = cmd.Wait()
	if !sent {
		t.Fatalf("demo never reached a pull (err %v):\n%s", err, strings.Join(lines, "\n"))
	}
	if code := cmd.ProcessState.ExitCode(); code != 130 {
		t.Errorf("interrupted demo exited %d, want 130:\n%s", code, strings.Join(lines, "\n"))
	}
	assertNothingLeft(t, parent)
}

// assertNothingLeft: no mounts, no processes and no run dir under parent.
func assertNothingLeft(t *testing.T, parent string) {
	t.Helper()
	if m := harness.MountsUnder(parent); len(m) > 0 {
		t.Errorf("mounts left: %v", m)
	}
	if p := harness.PidsMentioning(parent + "/dupdemo-"); len(p) > 0 {
		t.Errorf("processes left: %v", p)
	}
	if ds, _ := filepath.Glob(filepath.Join(parent, "dupdemo-*")); len(ds) > 0 {
		t.Errorf("run dirs left: %v", ds)
	}
}
