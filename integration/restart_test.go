package integration

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"

	"github.com/dupsnap/dupsnap/integration/harness"
)

// TestRestart kills -9 the daemon while a container reads and writes its
// rootfs in a loop: the container sees no error, and the restarted daemon
// commits and removes that container's snapshot correctly.
func TestRestart(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 150*time.Second)
	defer cancel()
	l, err := netListen()
	if err != nil {
		t.Fatal(err)
	}
	maddr := l.Addr().String()
	l.Close()
	e := newEnv(ctx, t, "--metrics-address", maddr)
	ti := buildImages(t)
	ref, err := e.reg.Push(ctx, "restart/one:v1", ti.img1)
	if err != nil {
		t.Fatal(err)
	}
	e.pull(ctx, t, "dupsnap", ref)
	probe := firstRegular(ti.files1[len(ti.base):], 0)
	sum, err := probe.SHA256()
	if err != nil {
		t.Fatal(err)
	}

	// The loop exits non-zero (and stops counting) at its first error.
	loop := `i=0; while true; do i=$((i+1));
echo $i > /counter.tmp || exit 3; mv /counter.tmp /counter || exit 4;
s=$(sha256sum /` + probe.Path + `) || exit 5; test "${s%% *}" = ` + sum + ` || exit 6;
sleep 0.02; done`
	args := append([]string{"run", "-d", "--snapshotter", "dupsnap"}, e.c.RunArgs()...)
	args = append(args, ref, "looper", "/bin/sh", "-c", loop)
	e.ctr(ctx, t, time.Minute, args...)
	t.Cleanup(func() {
		cctx, ccancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer ccancel()
		e.c.Ctr(cctx, 10*time.Second, "task", "kill", "--signal", "SIGKILL", "looper")
		e.c.Ctr(cctx, 10*time.Second, "task", "rm", "-f", "looper")
		e.c.Ctr(cctx, 10*time.Second, "container", "rm", "looper")
	})

	counter := func() int {
		out, err := e.c.Ctr(ctx, 20*time.Second, "task", "exec", "--exec-id", "probe"+strconv.FormatInt(time.Now().UnixNano(), 36), "looper", "cat", "/counter")
		if err != nil {
			t.Logf("exec: %v", err)
			return -1
		}
		// ctr may print warnings (cgroup v1 deprecation) before the output.
		lines := strings.Split(strings.TrimSpace(out), "\n")
		n, err := strconv.Atoi(strings.TrimSpace(lines[len(lines)-1]))
		if err != nil {
			t.Logf("counter %q: %v", out, err)
			return -1
		}
		return n
	}
	running := func() {
		out := e.ctr(ctx, t, 20*time.Second, "task", "ls")
		for _, l := range strings.Split(out, "\n") {
			if strings.HasPrefix(l, "looper") && !strings.Contains(l, "RUNNING") {
				t.Fatalf("container stopped: %s", l)
			}
		}
	}
	waitMore := func(than int) int {
		deadline := time.Now().Add(10 * time.Second)
		for time.Now().Before(deadline) {
			if n := counter(); n > than {
				return n
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Fatalf("container made no progress past %d", than)
		return 0
	}

	n0 := waitMore(0)
	e.d.Kill9()
	n1 := waitMore(n0 + 10) // keeps working with no daemon at all
	running()
	if err := e.d.Start(ctx); err != nil {
		t.Fatal(err)
	}
	n2 := waitMore(n1 + 10)
	running()
	t.Logf("counter %d before kill, %d while dead, %d after restart", n0, n1, n2)

	// The re-adopted rootfs server's FUSE counts reach the new daemon's
	// metrics (servers publish them; the daemon sums live ones).
	var ops float64
	for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline); time.Sleep(500 * time.Millisecond) {
		if ops, err = harness.ScrapeMetric(ctx, "http://"+maddr+"/metrics", `dupsnap_fuse_operations_total{op="write"}`); err == nil && ops > 0 {
			break
		}
	}
	if ops <= 0 {
		alive, _ := harness.ScrapeMetric(ctx, "http://"+maddr+"/metrics", "dupsnap_rootfs_alive")
		stats, _ := filepath.Glob(filepath.Join(e.d.Root, "snapshots", "*", "rootfs.stats"))
		for _, f := range stats {
			b, _ := os.ReadFile(f)
			t.Logf("%s: %s", f, b)
		}
		t.Errorf("dupsnap_fuse_operations_total{op=\"write\"} = %v (%v) after restart with %v rootfs servers alive, stats files %v: rootfs metrics not collected", ops, err, alive, stats)
	}

	// Stop the container and commit its snapshot through containerd with
	// the restarted daemon, then read the committed layer back.
	e.ctr(ctx, t, 20*time.Second, "task", "kill", "--signal", "SIGKILL", "looper")
	deadline := time.Now().Add(20 * time.Second)
	for {
		out, _ := e.c.Ctr(ctx, 10*time.Second, "task", "rm", "looper")
		if !strings.Contains(out, "running") || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	e.ctr(ctx, t, 30*time.Second, "snapshots", "--snapshotter", "dupsnap", "commit", "looper-committed", "looper")

	sn, closeFn, err := e.d.Client()
	if err != nil {
		t.Fatal(err)
	}
	defer closeFn()
	nctx := namespaces.WithNamespace(ctx, "x")
	var committed string
	if err := sn.Walk(nctx, func(_ context.Context, i snapshots.Info) error {
		if strings.HasSuffix(i.Name, "/looper-committed") && i.Kind == snapshots.KindCommitted {
			committed = i.Name
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if committed == "" {
		t.Fatal("committed snapshot not in the daemon")
	}
	mounts, err := sn.View(nctx, "check-view", committed)
	if err != nil {
		t.Fatal(err)
	}
	target := filepath.Join(e.dir, "check")
	if err := os.MkdirAll(target, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := mount.All(mounts, target); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(target, "counter"))
	_, perr := os.Stat(filepath.Join(target, probe.Path))
	if uerr := mount.UnmountAll(target, 0); uerr != nil {
		t.Error(uerr)
	}
	if err != nil || perr != nil {
		t.Fatalf("committed layer: counter %v, image file %v", err, perr)
	}
	if n, _ := strconv.Atoi(strings.TrimSpace(string(b))); n < n2 {
		t.Errorf("committed counter %q, want >= %d", b, n2)
	}
	if err := sn.Remove(nctx, "check-view"); err != nil {
		t.Fatal(err)
	}

	// Remove everything of the container through containerd.
	e.ctr(ctx, t, 20*time.Second, "container", "rm", "looper")
	e.ctr(ctx, t, 20*time.Second, "snapshots", "--snapshotter", "dupsnap", "rm", "looper-committed")
	// containerd removes backend snapshots in its garbage collector, soon after.
	var left []string
	for deadline := time.Now().Add(20 * time.Second); ; {
		left = nil
		if err := sn.Walk(nctx, func(_ context.Context, i snapshots.Info) error {
			if i.Kind != snapshots.KindCommitted || strings.Contains(i.Name, "looper") {
				left = append(left, i.Name+" "+i.Kind.String())
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		if len(left) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if len(left) > 0 {
		t.Errorf("snapshots left after removal: %v", left)
	}
	if mps := harness.MountsUnder(e.d.Root); len(mps) > 0 {
		t.Errorf("mounts left under the daemon root: %v", mps)
	}
}
