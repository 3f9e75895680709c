package main

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/dupsnap/dupsnap/integration/harness/stack"
)

// nodeParams are what the node benchmarks need from main.
type nodeParams struct {
	set     []*stack.Image
	bench   *stack.Image // set[0] plus the big file and inctr
	bigPath string
	reps    int
	small   int // files created by the create benchmark
	largeMB int
	writes  int // random 4 KiB writes
	logs    string
}

// Row names shared by the node benchmarks and the plots.
const (
	pull3    = "pull+unpack time, image set (no offload)"
	disk3    = "node disk after pulling (dupsnap root vs overlayfs snapshots)"
	seqF     = "sequential read, image files under /usr (warm)"
	seqB     = "sequential read, large image file (warm)"
	randB    = "random 4 KiB read, large image file (warm)"
	stat3    = "lstat walk of /usr (warm)"
	start3   = "container start+exit time (ctr run --rm)"
	ow4      = "4 KiB overwrite in the middle of the large file: time to first write"
	owDisk   = "4 KiB overwrite: extra disk used"
	rw4      = "random 4 KiB writes over the large file, copy-up included"
	crt4     = "create many small files and one large file"
	crtSmall = "  of which: 4 KiB files created"
	crtLarge = "  of which: large file written"
	modSeq   = "sequential read of the partly modified large file"
	modRnd   = "random 4 KiB read of the partly modified large file"
	rss4     = "RSS of one idle rootfs server"
	pull6    = "pull time, image set (dupsnap+dupproxy offload vs overlayfs+registry)"
	wire6    = "bytes over the wire, image set"
	disk6    = "node disk incl. content store, image set"
)

type rowDef struct {
	issue            int
	name, unit, base string
	goal             func(*Result)
}

// nodeRows are every row the node benchmarks produce.
var nodeRows = []rowDef{
	{3, seqF, "MB/s", "overlayfs", ratioGoal(">=", 0.95)},
	{3, seqB, "MB/s", "overlayfs", ratioGoal(">=", 0.95)},
	{3, randB, "MB/s", "overlayfs", ratioGoal(">=", 0.9)},
	{3, stat3, "files/s", "overlayfs", ratioGoal(">=", 0.7)},
	{3, start3, "s", "overlayfs", ratioGoal("<=", 1.2)},
	{3, pull3, "s", "overlayfs", ratioGoal("<=", 1.1)},
	{3, disk3, "MiB", "overlayfs snapshot dirs", ratioGoal("<=", 0.6)},
	{4, ow4, "ms", "overlayfs", ratioGoal("<=", 0.02)},
	{4, owDisk, "MiB", "overlayfs", absGoal("<=", 1, "MiB")},
	{4, rw4, "writes/s", "overlayfs", ratioGoal(">=", 1.0)},
	{4, crt4, "MB/s", "overlayfs", ratioGoal(">=", 0.8)},
	{4, modSeq, "MB/s", "overlayfs", ratioGoal(">=", 0.8)},
	{4, modRnd, "MB/s", "overlayfs", ratioGoal(">=", 0.8)},
	{4, rss4, "MiB", "", absGoal("<=", 16, "MiB")},
	{6, pull6, "s", "overlayfs from the plain registry", ratioGoal("<=", 0.5)},
	{6, wire6, "MiB", "overlayfs pull: the compressed blobs", ratioGoal("<=", 0.7)},
	{6, disk6, "MiB", "overlayfs snapshots + content store", ratioGoal("<=", 0.5)},
}

// naNode marks the node row name n/a with its proper unit and goal.
func naNode(rs *Results, name, reason string) {
	for _, r := range nodeRows {
		if r.name == name {
			rs.NA(r.issue, r.name, r.unit, r.base, r.goal, reason)
			return
		}
	}
}

// pullSteps keeps the per-image disk curve of the first repetition, for the plot.
var pullSteps = map[string][]stack.PullStep{}

func benchNodes(ctx context.Context, t *stack.T, rs *Results, rt *stack.RegTier, top string, p nodeParams) {
	for rep := 0; rep < p.reps; rep++ {
		err := stack.Do(t, fmt.Sprintf("rep%d", rep+1), func(t *stack.T) { nodeRep(ctx, t, rs, rt, filepath.Join(top, fmt.Sprintf("r%d", rep+1)), p, rep) })
		if err != nil {
			t.Logf("  rep %d: %v", rep+1, err)
			// Rows this repetition did not reach still show up, as n/a.
			for _, r := range nodeRows {
				naNode(rs, r.name, "rep failed: "+firstLine(err.Error()))
			}
		}
		if ctx.Err() != nil {
			return
		}
	}
}

func nodeRep(ctx context.Context, t *stack.T, rs *Results, rt *stack.RegTier, dir string, p nodeParams, rep int) {
	logf := t.Logf
	order := []string{"overlayfs", "dupsnap"}
	if rep%2 == 1 {
		order = []string{"dupsnap", "overlayfs"}
	}
	logf("==> rep %d: node with overlayfs and dupsnap (offload through dupproxy)", rep+1)
	n := stack.StartNode(ctx, t, dir+"a", rt, true)
	t.Cleanup(func() { stack.SaveLogs(dir+"a", filepath.Join(p.logs, filepath.Base(dir)+"a")) })
	if n.D == nil {
		for _, name := range []string{pull6, wire6, disk6} {
			naNode(rs, name, "dupsnap not running: "+n.DupErr)
		}
	}
	res := map[string]stack.PullResult{}
	for _, sn := range order {
		if sn == "dupsnap" && n.D == nil {
			continue
		}
		res[sn] = n.PullAll(ctx, sn, p.set, logf)
		if res[sn].Err != "" {
			logf("  %s: %s", sn, res[sn].Err)
		}
		if rep == 0 {
			pullSteps[sn+" (offload)"] = res[sn].Steps
		}
	}
	ovl, dup := res["overlayfs"], res["dupsnap"]
	if ovl.Err != "" {
		t.Fatalf("overlayfs pull failed: %s", ovl.Err)
	}
	if n.D != nil {
		if dup.Err != "" {
			for _, name := range []string{pull6, wire6, disk6} {
				naNode(rs, name, dup.Err)
			}
		} else {
			note := ""
			if !n.Offload {
				note = "offload not available (dupsnap serve has no --proxy): ordinary unpack through dupproxy"
			}
			rs.Add(6, pull6, "s", "overlayfs from the plain registry", ratioGoal("<=", 0.5), dup.Time.Seconds(), ovl.Time.Seconds())
			rs.Add(6, wire6, "MiB", "overlayfs pull: the compressed blobs", ratioGoal("<=", 0.7), mib(dup.Wire), mib(ovl.Wire))
			rs.Add(6, disk6, "MiB", "overlayfs snapshots + content store", ratioGoal("<=", 0.5), mib(dup.Disk()), mib(ovl.Disk()))
			if note != "" {
				rs.Note(6, pull6, note)
			}
		}
	}
	// Container benchmarks on the bench image.
	for _, sn := range order {
		if sn == "dupsnap" && n.D == nil {
			continue
		}
		if _, err := n.Pull(ctx, sn, p.bench); err != nil {
			t.Fatalf("%s: pull bench image: %v", sn, err)
		}
	}
	out := map[string]map[string]float64{}
	for _, sn := range order {
		if sn == "dupsnap" && n.D == nil {
			continue
		}
		out[sn] = containerBenches(ctx, t, n, sn, p, rep)
	}
	o, d := out["overlayfs"], out["dupsnap"]
	addBoth := func(issue int, name, unit string, goal func(*Result), key string) {
		if d == nil {
			naNode(rs, name, "dupsnap not running: "+n.DupErr)
			return
		}
		dv, okd := d[key]
		ov, oko := o[key]
		if !okd || !oko {
			naNode(rs, name, "not measured: "+errOf(d, o))
			return
		}
		rs.Add(issue, name, unit, "overlayfs", goal, dv, ov)
	}
	addBoth(3, seqF, "MB/s", ratioGoal(">=", 0.95), "seq_files_mbps")
	addBoth(3, seqB, "MB/s", ratioGoal(">=", 0.95), "seq_big_mbps")
	addBoth(3, randB, "MB/s", ratioGoal(">=", 0.9), "rand_big_mbps")
	addBoth(3, stat3, "files/s", ratioGoal(">=", 0.7), "stat_rate")
	addBoth(3, start3, "s", ratioGoal("<=", 1.2), "start_s")
	addBoth(4, ow4, "ms", ratioGoal("<=", 0.02), "first_write_ms")
	addBoth(4, owDisk, "MiB", absGoal("<=", 1, "MiB"), "overwrite_extra_mib")
	addBoth(4, rw4, "writes/s", ratioGoal(">=", 1.0), "randwrite_iops")
	addBoth(4, crt4, "MB/s", ratioGoal(">=", 0.8), "create_mbps")
	// The two halves of the create benchmark as context: the combined
	// figure is mostly the large file's bytes, the small files are mostly
	// round trips (and ext4 without a journal makes the baseline's creates
	// swing with how recently inodes nearby were freed).
	addBoth(4, crtSmall, "files/s", func(*Result) {}, "small_files_per_s")
	addBoth(4, crtLarge, "MB/s", func(*Result) {}, "large_mbps")
	addBoth(4, modSeq, "MB/s", ratioGoal(">=", 0.8), "mod_seq_mbps")
	addBoth(4, modRnd, "MB/s", ratioGoal(">=", 0.8), "mod_rand_mbps")
	if d == nil {
		naNode(rs, rss4, "dupsnap not running: "+n.DupErr)
	} else {
		if v, ok := d["rss_mib"]; ok {
			rs.Add(4, rss4, "MiB", "", absGoal("<=", 16, "MiB"), v, -1)
		} else {
			naNode(rs, rss4, "no rootfs server process found")
		}
	}
	rs.Note(4, ow4, "goal: >= 50x faster than overlayfs copy-up")
	rs.Note(4, owDisk, fmt.Sprintf("du growth of the snapshotter's storage with the container kept, minus that of a kept container that wrote nothing (dupsnap %.1f MiB, overlayfs %.1f MiB); "+
		"dupsnap's figure includes its region's growth (a 256 KiB reserve, then 16 MiB steps: [rootfs] region_reserve) and excludes its merged-tree cache; overlayfs copies the whole file up",
		d["container_reserve_mib"], o["container_reserve_mib"]))
	t.Close() // node a down before node b: one node's load at a time

	logf("==> rep %d: node with dupsnap pulling straight from the registry (ordinary unpack)", rep+1)
	n2 := stack.StartNode(ctx, t, dir+"b", rt, false)
	t.Cleanup(func() { stack.SaveLogs(dir+"b", filepath.Join(p.logs, filepath.Base(dir)+"b")) })
	if n2.D == nil {
		naNode(rs, pull3, "dupsnap not running: "+n2.DupErr)
		naNode(rs, disk3, "dupsnap not running: "+n2.DupErr)
		return
	}
	plain := n2.PullAll(ctx, "dupsnap", p.set, logf)
	if plain.Err != "" {
		naNode(rs, pull3, plain.Err)
		naNode(rs, disk3, plain.Err)
		return
	}
	if rep == 0 {
		pullSteps["dupsnap (no offload)"] = plain.Steps
	}
	rs.Add(3, pull3, "s", "overlayfs", ratioGoal("<=", 1.1), plain.Time.Seconds(), ovl.Time.Seconds())
	rs.Add(3, disk3, "MiB", "overlayfs snapshot dirs", ratioGoal("<=", 0.6), mib(plain.SnapDisk), mib(ovl.SnapDisk))
}

func mib(n int64) float64 { return float64(n) / (1 << 20) }

func errOf(ms ...map[string]float64) string {
	for _, m := range ms {
		if m != nil {
			if _, ok := m["error"]; ok {
				return "a container benchmark failed (see log)"
			}
		}
	}
	return "see log"
}

// containerBenches runs the in-container measurements on one snapshotter.
// A failing step is logged and leaves its keys out.
func containerBenches(ctx context.Context, t *stack.T, n *stack.Node, sn string, p nodeParams, rep int) map[string]float64 {
	res := map[string]float64{}
	id := func(s string) string { return fmt.Sprintf("b%d-%s-%s", rep, stack.NS(sn), s) }
	tool := "/bench/inctr"
	run := func(name string, keep bool, args ...string) map[string]float64 {
		var out string
		var err error
		if keep {
			out, err = n.RunKeep(ctx, sn, p.bench, id(name), 5*time.Minute, append([]string{tool}, args...)...)
		} else {
			out, err = n.Run(ctx, sn, p.bench, id(name), 5*time.Minute, append([]string{tool}, args...)...)
		}
		if err != nil {
			t.Logf("  %s %s: %v", sn, name, firstLine(err.Error()))
			res["error"] = 1
			return nil
		}
		m := map[string]float64{}
		i := strings.Index(out, "{")
		if i < 0 || json.Unmarshal([]byte(strings.TrimSpace(out[i:])), &m) != nil {
			t.Logf("  %s %s: unexpected output %q", sn, name, out)
			res["error"] = 1
			return nil
		}
		return m
	}
	// Start time: the whole ctr run --rm of a no-op, median of 3.
	var starts []float64
	for i := 0; i < 3; i++ {
		t0 := time.Now()
		if _, err := n.Run(ctx, sn, p.bench, id(fmt.Sprint("start", i)), 2*time.Minute, tool, "true"); err != nil {
			t.Logf("  %s start: %v", sn, firstLine(err.Error()))
			break
		}
		starts = append(starts, time.Since(t0).Seconds())
	}
	if len(starts) > 0 {
		res["start_s"] = median(starts)
	}
	if m := run("reads", false, "reads", p.bigPath, "/usr"); m != nil {
		for k, v := range m {
			res[k] = v
		}
		if m["stat_s"] > 0 {
			res["stat_rate"] = m["stat_files"] / m["stat_s"]
		}
	}
	// Extra disk of the overwrite: storage growth with an overwriting
	// container kept, minus that of a kept container that writes nothing
	// (its per-container reserve, if any, is not the write's cost).
	before := containerDisk(n, sn)
	if _, err := n.RunKeep(ctx, sn, p.bench, id("control"), 2*time.Minute, tool, "true"); err != nil {
		t.Logf("  %s control container: %v", sn, firstLine(err.Error()))
	}
	control := containerDisk(n, sn) - before
	if m := run("overwrite", true, "overwrite", p.bigPath); m != nil {
		res["first_write_ms"] = m["first_write_s"] * 1e3
		res["overwrite_extra_mib"] = mib(containerDisk(n, sn) - before - 2*control)
		res["container_reserve_mib"] = mib(control)
	}
	for _, c := range []string{"control", "overwrite"} {
		if err := n.Remove(ctx, sn, id(c)); err != nil {
			t.Logf("  %s: remove %s container: %v", sn, c, firstLine(err.Error()))
		}
	}
	if m := run("randwrite", false, "randwrite", p.bigPath, fmt.Sprint(p.writes)); m != nil {
		for k, v := range m {
			res[k] = v
		}
	}
	if m := run("create", false, "create", "/root/out", fmt.Sprint(p.small), fmt.Sprint(p.largeMB)); m != nil {
		res["create_mbps"] = float64(int64(p.small)*4096+int64(p.largeMB)<<20) / 1e6 / m["create_s"]
		res["small_files_per_s"], res["large_mbps"] = m["small_files_per_s"], m["large_mbps"]
	}
	if sn == "dupsnap" {
		if v := idleRSS(ctx, t, n, sn, p.bench, id("idle")); v > 0 {
			res["rss_mib"] = v
		}
	}
	t.Logf("  %-9s in-container: %s", sn, summary(res))
	return res
}

// containerDisk is the snapshotter's disk without dupsnap's merged-tree
// cache (rootfs-trees: written once per image chain, whenever its first
// server gets to it, so it would land in a per-container difference).
func containerDisk(n *stack.Node, sn string) int64 {
	d := n.SnapshotDisk(sn)
	if sn != "overlayfs" && n.D != nil {
		d -= stack.DiskUsage(filepath.Join(n.D.Root, "rootfs-trees"))
	}
	return d
}

// idleRSS starts a sleeping container and reads the RSS of the rootfs
// server process that appeared for it.
func idleRSS(ctx context.Context, t *stack.T, n *stack.Node, sn string, im *stack.Image, id string) float64 {
	old := map[int]bool{}
	for _, pid := range n.RootfsPids() {
		old[pid] = true
	}
	done := make(chan error, 1)
	go func() {
		_, err := n.Run(ctx, sn, im, id, time.Minute, "/bench/inctr", "sleep", "10")
		done <- err
	}()
	var rss float64
	deadline := time.After(8 * time.Second)
	time.Sleep(1500 * time.Millisecond) // started and idle
loop:
	for {
		for _, pid := range n.RootfsPids() {
			if !old[pid] {
				rss = max(rss, mib(stack.RSS(pid)))
			}
		}
		if rss > 0 {
			break
		}
		select {
		case <-deadline:
			break loop
		case <-time.After(100 * time.Millisecond):
		}
	}
	if err := <-done; err != nil {
		t.Logf("  idle container: %v", firstLine(err.Error()))
	}
	return rss
}

func summary(m map[string]float64) string {
	keys := []string{"start_s", "seq_files_mbps", "seq_big_mbps", "rand_big_mbps", "stat_rate", "first_write_ms", "overwrite_extra_mib", "randwrite_iops", "create_mbps", "mod_seq_mbps", "mod_rand_mbps", "rss_mib"}
	var b strings.Builder
	for _, k := range keys {
		if v, ok := m[k]; ok {
			fmt.Fprintf(&b, "%s=%.3g ", k, v)
		}
	}
	return b.String()
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}
