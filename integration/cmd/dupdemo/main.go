// Command dupdemo is `make demo`: it builds demo images with real
// duplication from this machine's /usr, starts a registry, dupproxy,
// dupsnap and a private containerd under one temp dir, pulls every image
// with overlayfs (from the registry) and with dupsnap (through dupproxy),
// runs a container of each, and prints what each snapshotter cost. It
// removes every process, mount and file it made on exit, Ctrl-C or failure.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"text/tabwriter"
	"time"

	"github.com/dupsnap/dupsnap/integration/harness"
	"github.com/dupsnap/dupsnap/integration/harness/stack"
)

func main() {
	images := flag.Int("images", 4, "number of demo images")
	imageMB := flag.Int("image-mb", 40, "approximate uncompressed MiB per image")
	parent := flag.String("dir", "/var/tmp", "where the run's temp dir goes")
	timeout := flag.Duration("timeout", 20*time.Minute, "give up (and clean up) after this long")
	logs := flag.String("logs", "/var/tmp/dupdemo-logs", "where the components' logs are kept if the run fails")
	flag.Parse()
	os.Exit(run(*images, *imageMB, *parent, *logs, *timeout))
}

func run(images, imageMB int, parent, logs string, timeout time.Duration) int {
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "dupdemo: run as root (containerd, mounts, FUSE): sudo make demo")
		return 2
	}
	for _, f := range []string{harness.DupsnapBin(), harness.DupproxyBin(), filepath.Join(harness.ToolsDir(), "containerd"),
		filepath.Join(harness.ToolsDir(), "ctr"), filepath.Join(harness.ToolsDir(), "registry"), "/usr/sbin/runc"} {
		if _, err := os.Stat(f); err != nil {
			fmt.Fprintf(os.Stderr, "dupdemo: %s missing: run `make build tools` (and `apt-get install runc` for runc)\n", f)
			return 2
		}
	}
	var top string
	ctx, stop := stack.SignalContext(func() string { return top }, 60*time.Second)
	defer stop()
	// A deadline of its own: even if whatever started it is gone (a CI
	// job killed on timeout), the demo ends and cleans up.
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	top, err := stack.TopDir(parent, "dupdemo")
	if err != nil {
		fmt.Fprintln(os.Stderr, "dupdemo:", err)
		return 1
	}
	t := stack.NewT(ctx, "demo", os.Stdout)
	t.Cleanup(func() {
		if err := stack.Emergency(top); err != nil {
			fmt.Fprintf(os.Stderr, "dupdemo: cleanup of %s: %v\n", top, err)
		}
	})
	err = stack.Do(t, "demo", func(t *stack.T) { demo(ctx, t, top, images, imageMB) })
	if err != nil {
		// Only a failed run leaves something behind: its logs, to read.
		_ = stack.SaveLogs(top, logs)
	}
	fmt.Println("==> cleaning up (processes, mounts, files)")
	t.Close()
	if left := harness.MountsUnder(top); len(left) > 0 {
		fmt.Fprintf(os.Stderr, "dupdemo: still mounted: %v\n", left)
		return 1
	}
	if err != nil {
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			fmt.Fprintf(os.Stderr, "dupdemo: gave up after --timeout %s: %v\n  component logs: %s\n", timeout, err, logs)
			return 1
		}
		if ctx.Err() != nil {
			fmt.Fprintln(os.Stderr, "dupdemo: interrupted")
			return 130
		}
		fmt.Fprintf(os.Stderr, "dupdemo: FAILED: %v\n  component logs: %s\n", err, logs)
		if errors.Is(err, stack.ErrSkipped) {
			return 2
		}
		return 1
	}
	fmt.Println("done: nothing left behind")
	return 0
}

func demo(ctx context.Context, t *stack.T, top string, images, imageMB int) {
	step := func(f string, a ...any) { fmt.Printf("==> "+f+"\n", a...) }
	step("building %d demo images from files under /usr (run dir %s)", images, top)
	set, err := stack.BuildSet(stack.SetOptions{Images: images, ImageMB: imageMB}, t.Logf)
	stack.Check(t, err, "demo images")
	var logical int64
	for _, im := range set {
		logical += im.Logical
	}
	t.Logf("  %d images, %s of files in all; layers of each: %v", len(set), stack.MiB(logical), set[0].Layers)

	step("starting the upstream registry and dupproxy")
	rt := stack.StartRegTier(ctx, t, filepath.Join(top, "registry"))
	t0 := time.Now()
	stack.Check(t, rt.Push(ctx, set), "push")
	t.Logf("  pushed to %s in %.1fs", rt.Registry.Host, time.Since(t0).Seconds())
	if rt.ProxyUp() {
		t0 = time.Now()
		if err := rt.Warm(ctx, set); err != nil {
			t.Logf("  dupproxy warm-up failed (%v): dupsnap pulls will fall back to the registry", err)
		} else {
			rt.WaitSettled(ctx, 2*time.Minute)
			t.Logf("  dupproxy fetched and deduplicated every image once in %.1fs (a mirror does this once for all nodes)", time.Since(t0).Seconds())
		}
	}

	step("starting dupsnap and a private containerd (overlayfs + dupsnap)")
	n := stack.StartNode(ctx, t, filepath.Join(top, "node"), rt, true)
	if n.D == nil {
		t.Fatalf("dupsnap did not start: %s", n.DupErr)
	}
	mode := "ordinary unpack (dupsnap serve has no --proxy yet)"
	if n.Offload {
		mode = "offload: layer manifests + missing files from dupproxy"
	}
	t.Logf("  dupsnap pulls through dupproxy as registry mirror; %s", mode)

	step("pulling every image with each snapshotter")
	ovl := n.PullAll(ctx, "overlayfs", set, t.Logf)
	if ovl.Err != "" {
		t.Fatalf("overlayfs: %s\n%s", ovl.Err, n.C.Proc.Tail())
	}
	dup := n.PullAll(ctx, "dupsnap", set, t.Logf)
	if dup.Err != "" {
		t.Fatalf("dupsnap: %s\n%s", dup.Err, n.D.Tail())
	}

	step("running a container of each image on each snapshotter (checking files against their build-time sha256)")
	for i, im := range set {
		for _, sn := range []string{"overlayfs", "dupsnap"} {
			d, err := n.RunCheck(ctx, sn, im, fmt.Sprintf("demo-%s-%d", stack.NS(sn), i))
			if err != nil {
				t.Fatalf("%s container of %s: %v", sn, im.Repo, err)
			}
			t.Logf("  %-9s %-6s ran, files verified (%.2fs)", sn, im.Short(), d.Seconds())
		}
	}

	step("result: %d images, %s of image files", len(set), stack.MiB(logical))
	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(w, "\toverlayfs\tdupsnap\tdupsnap/overlayfs\t")
	row := func(name string, a, b int64, f func(int64) string) {
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t\n", name, f(a), f(b), ratio(b, a))
	}
	row("disk: snapshots / dupsnap root", ovl.SnapDisk, dup.SnapDisk, stack.MiB)
	row("disk: content store", ovl.ContentDisk, dup.ContentDisk, stack.MiB)
	row("disk: total", ovl.Disk(), dup.Disk(), stack.MiB)
	row("bytes transferred", ovl.Wire, dup.Wire, stack.MiB)
	row("pull time (all images)", int64(ovl.Time), int64(dup.Time), func(d int64) string { return fmt.Sprintf("%.2fs", time.Duration(d).Seconds()) })
	w.Flush()
	if n.Offload {
		fmt.Println("dupsnap: offload on (manifests + missing files from dupproxy)")
	} else {
		fmt.Println("dupsnap: offload not available yet (dupsnap serve has no --proxy): layers were downloaded whole through dupproxy and deduplicated on the node")
	}
	if rt.ProxyUp() {
		if st, err := rt.ProxyStats(ctx); err == nil {
			fmt.Printf("registry tier: dupproxy store %s for %s of upstream blobs (%s)\n",
				stack.MiB(num(st["physicalBytes"])), stack.MiB(rt.RegistryBlobBytes()), ratio(num(st["physicalBytes"]), rt.RegistryBlobBytes()))
		} else {
			t.Logf("  dupproxy stats: %v", err)
		}
	}
}

func num(v any) int64 {
	f, _ := v.(float64)
	return int64(f)
}

func ratio(a, b int64) string {
	if b == 0 {
		return "n/a"
	}
	return fmt.Sprintf("%.2fx", float64(a)/float64(b))
}
