// Command benchreport is `make bench`: it runs every benchmark named in
// issues 2-6 side by side with its baseline in the same run, repeats them
// to quote medians, and writes bench/results/REPORT.md, results.json and
// PNG plots. A benchmark whose component is not ready is reported as
// "n/a: <reason>" instead of failing the run. Everything it starts lives
// under one temp dir and is removed on exit, Ctrl-C or failure.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/mutate"

	"github.com/dupsnap/dupsnap/integration/harness"
	"github.com/dupsnap/dupsnap/integration/harness/stack"
)

type params struct {
	images, imageMB, reps, bigMB, small, largeMB, writes, storeMB, usrFiles int
	out, dir, inctr, logs, only                                             string
	timeout                                                                 time.Duration
}

func main() {
	var p params
	flag.IntVar(&p.images, "images", 6, "images in the pulled set")
	flag.IntVar(&p.imageMB, "image-mb", 40, "approximate uncompressed MiB per image of the set")
	flag.IntVar(&p.reps, "reps", 3, "repetitions (values are medians)")
	flag.IntVar(&p.bigMB, "big-mb", 256, "size of the large image file the read/write benchmarks use (MiB)")
	flag.IntVar(&p.small, "small-files", 2000, "files created by the create benchmark")
	flag.IntVar(&p.largeMB, "large-mb", 64, "large file written by the create benchmark (MiB)")
	flag.IntVar(&p.writes, "writes", 2000, "random 4 KiB writes over the large file")
	flag.IntVar(&p.storeMB, "store-mb", 128, "size of the layer of the ingest/export benchmark (MiB)")
	flag.IntVar(&p.usrFiles, "usr-files", 5000, "files of this machine's /usr added to the bench image (walk and read benchmarks)")
	flag.StringVar(&p.out, "out", "bench/results", "where REPORT.md, results.json and the plots go")
	flag.StringVar(&p.dir, "dir", "/var/tmp", "where the run's temp dir goes")
	flag.StringVar(&p.inctr, "inctr", "bin/inctr", "the static in-container helper (built by hack/bench.sh)")
	flag.StringVar(&p.logs, "logs", "/var/tmp/dupbench-logs", "where the components' logs are kept after the run")
	flag.DurationVar(&p.timeout, "timeout", 2*time.Hour, "give up (clean up, write what was measured) after this long")
	flag.StringVar(&p.only, "only", "", "run only these parts, comma-separated: store (issue 2), cow (pkg/cow), proxy (issue 5), nodes (issues 3, 4, 6); the report then goes to $TMPDIR/dupbench-partial unless --out is given")
	flag.Parse()
	if p.only != "" {
		outSet := false
		flag.Visit(func(f *flag.Flag) { outSet = outSet || f.Name == "out" })
		if !outSet {
			p.out = filepath.Join(os.TempDir(), "dupbench-partial")
		}
	}
	os.Exit(run(p))
}

func run(p params) int {
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "benchreport: run as root (containerd, mounts, FUSE): sudo make bench")
		return 2
	}
	if _, err := os.Stat(p.inctr); err != nil {
		fmt.Fprintf(os.Stderr, "benchreport: %s missing: build it with CGO_ENABLED=0 go build -o bin/inctr ./integration/cmd/benchreport/inctr (hack/bench.sh does)\n", p.inctr)
		return 2
	}
	p.inctr, _ = filepath.Abs(p.inctr)
	var top string
	sigctx, stop := stack.SignalContext(func() string { return top }, 60*time.Second)
	defer stop()
	// Its own deadline: the run ends and cleans up even if its parent is gone.
	ctx, cancel := context.WithTimeout(sigctx, p.timeout)
	defer cancel()
	top, err := stack.TopDir(p.dir, "dupbench")
	if err != nil {
		fmt.Fprintln(os.Stderr, "benchreport:", err)
		return 1
	}
	start := time.Now()
	os.RemoveAll(p.logs)
	t := stack.NewT(ctx, "bench", os.Stdout)
	t.Cleanup(func() {
		if err := stack.Emergency(top); err != nil {
			fmt.Fprintf(os.Stderr, "benchreport: cleanup of %s: %v\n", top, err)
		}
	})
	rep := Report{Machine: machine(top), Params: map[string]any{"images": p.images, "image_mb": p.imageMB, "reps": p.reps, "big_mb": p.bigMB,
		"small_files": p.small, "large_mb": p.largeMB, "writes": p.writes, "store_mb": p.storeMB, "usr_files": p.usrFiles}}
	rs := &Results{}
	err = stack.Do(t, "bench", func(t *stack.T) { bench(ctx, t, rs, &rep, top, p) })
	_ = stack.SaveLogs(top, filepath.Join(p.logs, "registry-tier"))
	fmt.Println("==> cleaning up (processes, mounts, files)")
	t.Close()
	if sigctx.Err() != nil {
		fmt.Fprintln(os.Stderr, "benchreport: interrupted; no report written")
		return 130
	}
	if ctx.Err() != nil {
		rep.Log = append(rep.Log, fmt.Sprintf("run hit --timeout %s: later benchmarks not measured", p.timeout))
	}
	if err != nil {
		rep.Log = append(rep.Log, "run stopped early: "+err.Error())
		fmt.Fprintf(os.Stderr, "benchreport: %v (component logs: %s); writing what was measured\n", err, p.logs)
	}
	rep.Machine.LoadTo = loadavg()
	rep.Results = rs.Finish()
	rep.Pulls = pullSteps
	rep.Elapsed = time.Since(start).Round(time.Second).String()
	if err := writeReport(p.out, rep); err != nil {
		fmt.Fprintln(os.Stderr, "benchreport: writing report:", err)
		return 1
	}
	printSummary(rep)
	fmt.Printf("report: %s (component logs: %s)\n", filepath.Join(p.out, "REPORT.md"), p.logs)
	if len(harness.MountsUnder(top)) > 0 {
		fmt.Fprintf(os.Stderr, "benchreport: mounts left under %s\n", top)
		return 1
	}
	if err != nil {
		return 1
	}
	return 0
}

// wants reports whether part is selected by --only (everything when unset).
func (p params) wants(part string) bool {
	if p.only == "" {
		return true
	}
	for _, s := range strings.Split(p.only, ",") {
		if strings.TrimSpace(s) == part {
			return true
		}
	}
	return false
}

func bench(ctx context.Context, t *stack.T, rs *Results, rep *Report, top string, p params) {
	step := func(f string, a ...any) { fmt.Printf("==> "+f+"\n", a...) }
	note := func(f string, a ...any) { t.Logf(f, a...); rep.Log = append(rep.Log, fmt.Sprintf(f, a...)) }

	scratch := filepath.Join(top, "scratch")
	stack.Check(t, os.MkdirAll(scratch, 0o755), "scratch dir")
	if p.wants("store") {
		step("issue 2: ingest and export of a %d MiB layer vs sha256 (%d reps)", p.storeMB, p.reps)
		benchStoreStep(ctx, rs, scratch, p, t.Logf, note)
	}
	if ctx.Err() != nil {
		return
	}
	if p.wants("cow") {
		step("issue 4: pkg/cow's own benchmarks (go test -bench, %d counts)", p.reps)
		benchCowStep(ctx, rs, scratch, p, t.Logf, note)
	}
	if ctx.Err() != nil || !p.wants("proxy") && !p.wants("nodes") {
		return
	}

	step("building %d images (~%d MiB each) from /usr and a bench image with a %d MiB file", p.images, p.imageMB, p.bigMB)
	set, err := stack.BuildSet(stack.SetOptions{Images: p.images, ImageMB: p.imageMB}, t.Logf)
	stack.Check(t, err, "image set")
	bigLayer, err := stack.GzipLayer([]harness.File{{Path: "data/big.bin", Data: stack.RandomData(p.bigMB<<20, 1)}})
	stack.Check(t, err, "big file layer")
	toolLayer, err := stack.GzipLayer([]harness.File{{Path: "bench/inctr", Src: p.inctr, Mode: 0o755}, {Path: "root", Dir: true, Mode: 0o700}})
	stack.Check(t, err, "tool layer")
	// A /usr tree of realistic size and mix for the walk and read
	// benchmarks: files up to 1 MiB (here ~1.4% of the files are 256 KiB
	// or more and hold ~37% of the bytes), so both of dupsnap's read paths
	// (small files cached per mount, larger ones passthrough, see
	// [rootfs] passthrough_min_size) are measured.
	usr, err := harness.HostFiles([]string{"/usr/share", "/usr/lib"}, p.usrFiles, 1<<20, 96<<20)
	stack.Check(t, err, "usr files")
	usrLayer, err := stack.GzipLayer(usr)
	stack.Check(t, err, "usr layer")
	benchImg, err := mutate.AppendLayers(set[0].Img, usrLayer, bigLayer, toolLayer)
	stack.Check(t, err, "bench image")
	bench := &stack.Image{Repo: "demo/bench:v1", Img: benchImg}

	step("registry tier: distribution registry + dupproxy")
	rt := stack.StartRegTier(ctx, t, filepath.Join(top, "registry"))
	stack.Check(t, rt.Push(ctx, set), "push")
	if rt.ProxyUp() {
		t0 := time.Now()
		if err := rt.Warm(ctx, set); err != nil {
			note("dupproxy warm-up failed: %v", err)
		} else {
			t.Logf("  dupproxy ingested the set in %.1fs", time.Since(t0).Seconds())
			if !rt.WaitSettled(ctx, 3*time.Minute) {
				note("dupproxy recipe detection still running after 3 min: store bytes include retained blobs")
			}
		}
	} else {
		note("dupproxy not available: %s", firstLine(rt.ProxyErr))
	}

	if p.wants("proxy") {
		step("issue 5: dupproxy vs the upstream registry")
		benchProxy(ctx, rs, rt, set, p.reps, scratch, t.Logf)
	}
	if ctx.Err() != nil || !p.wants("nodes") {
		return
	}
	stack.Check(t, rt.Push(ctx, []*stack.Image{bench}), "push bench image")
	if rt.ProxyUp() {
		if err := rt.Warm(ctx, []*stack.Image{bench}); err != nil {
			note("dupproxy warm-up of the bench image failed: %v", err)
		}
		rt.WaitSettled(ctx, 3*time.Minute)
	}

	step("issues 3, 4, 6: nodes, %d repetitions", p.reps)
	benchNodes(ctx, t, rs, rt, top, nodeParams{set: set, bench: bench, bigPath: "/data/big.bin", reps: p.reps,
		small: p.small, largeMB: p.largeMB, writes: p.writes, logs: p.logs})
}

func printSummary(r Report) {
	fmt.Println("==> summary (value / baseline = ratio, goal, status)")
	for _, x := range r.Results {
		if strings.HasPrefix(x.Status, "n/a") {
			fmt.Printf("  [%d] %-70.70s %s\n", x.Issue, x.Name, firstLine(x.Status))
			continue
		}
		fmt.Printf("  [%d] %-70.70s %10s %-6s / %10s = %7s  %-9s %s\n", x.Issue, x.Name, num(x.Value), x.Unit, num(x.Baseline),
			fmt.Sprintf("%.3gx", x.Ratio), x.Goal, x.Status)
	}
}

func benchStoreStep(ctx context.Context, rs *Results, scratch string, p params, logf, note func(string, ...any)) {
	if err := benchStore(ctx, rs, scratch, p.storeMB, p.reps, logf); err != nil {
		note("issue 2 benchmarks failed: %v", err)
		rs.NA(2, "ingest MB/s (uncompressed layer, durable CAS)", "MB/s", "sha256 over the same bytes", ratioGoal(">=", 0.5), err.Error())
	}
}

func benchCowStep(ctx context.Context, rs *Results, scratch string, p params, logf, note func(string, ...any)) {
	if err := benchGoPkg(ctx, rs, "pkg/cow", cowPairs, p.reps, scratch, logf); err != nil {
		note("pkg/cow benchmarks: %v", err)
		for _, c := range cowPairs {
			rs.NA(c.issue, c.row, "ms/op", c.base, c.goal, firstLine(err.Error()))
		}
	}
}
