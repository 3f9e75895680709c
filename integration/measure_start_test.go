package integration

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/dupsnap/dupsnap/integration/harness"
)

// TestMeasureStart times `ctr run --rm IMAGE ID true` (the bench's
// "container start+exit time") through dupsnap and through containerd's
// overlayfs snapshotter on one private containerd, alternating, and prints
// the medians, the ratio (goal <= 1.2x) and the median time dupsnap's
// Prepare spent starting the rootfs server. The image is shaped like the
// bench image: a base userland, ~5000 small files of this machine's /usr
// (DUPSNAP_MEASURE_FILES), and two more layers. Gated: a measurement, not
// a check (DUPSNAP_MEASURE=1; DUPSNAP_MEASURE_REPS runs per snapshotter,
// default 10).
func TestMeasureStart(t *testing.T) {
	if os.Getenv("DUPSNAP_MEASURE") == "" {
		t.Skip("measurement; set DUPSNAP_MEASURE=1")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	reps := 10
	if n, err := strconv.Atoi(os.Getenv("DUPSNAP_MEASURE_REPS")); err == nil && n > 0 {
		reps = n
	}
	nfiles := 5000
	if n, err := strconv.Atoi(os.Getenv("DUPSNAP_MEASURE_FILES")); err == nil && n > 0 {
		nfiles = n
	}
	harness.Require(t, harness.DupsnapBin())
	dir := harness.TempDir(t, "dsstart-")
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	maddr := l.Addr().String()
	l.Close()
	// DUPSNAP_MEASURE_CONFIG: the daemon's config (e.g. "[rootfs]\ndebug = true").
	d := harness.StartDupsnap(ctx, t, dir, strings.ReplaceAll(os.Getenv("DUPSNAP_MEASURE_CONFIG"), `\n`, "\n"), "--metrics-address", maddr)
	opAvg := func(op string) (sum, count float64) {
		url := "http://" + maddr + "/metrics"
		sum, _ = harness.ScrapeMetric(ctx, url, `dupsnap_snapshot_operation_seconds_sum{op="`+op+`"}`)
		count, _ = harness.ScrapeMetric(ctx, url, `dupsnap_snapshot_operation_seconds_count{op="`+op+`"}`)
		return sum, count
	}
	c := harness.StartContainerd(ctx, t, dir, harness.ContainerdOptions{DupsnapSocket: d.Socket, DupsnapRoot: d.Root})
	reg := harness.StartRegistry(ctx, t, dir)
	t.Cleanup(func() {
		if t.Failed() {
			t.Log(d.Tail())
			t.Log(harness.LogTail(c.LogFile, 30))
		}
		// DUPSNAP_MEASURE_KEEP=DIR: the daemons' logs for a timeline.
		if keep := os.Getenv("DUPSNAP_MEASURE_KEEP"); keep != "" {
			os.MkdirAll(keep, 0o755)
			logs, _ := filepath.Glob(filepath.Join(d.Root, "snapshots", "*", "rootfs.log"))
			for _, f := range append([]string{d.LogFile, c.LogFile}, logs...) {
				name := filepath.Base(f)
				if name == "rootfs.log" {
					name = "rootfs-" + filepath.Base(filepath.Dir(f)) + ".log"
				}
				if b, err := os.ReadFile(f); err == nil {
					os.WriteFile(filepath.Join(keep, name), b, 0o644)
				}
			}
		}
	})
	img := startImage(t, nfiles)
	ref, err := reg.Push(ctx, "meas/start:v1", img)
	if err != nil {
		t.Fatal(err)
	}
	ctr := func(timeout time.Duration, args ...string) error {
		out, err := c.Ctr(ctx, timeout, args...)
		if err != nil {
			return fmt.Errorf("ctr %v: %v\n%s", args, err, out)
		}
		return nil
	}
	for _, sn := range []string{"overlayfs", "dupsnap"} {
		if err := ctr(3*time.Minute, "image", "pull", "--plain-http", "--snapshotter", sn, ref); err != nil {
			t.Fatal(err)
		}
		// One warm-up run each: first-exec page cache, shim binary.
		if err := ctr(time.Minute, append(append([]string{"run", "--rm", "--snapshotter", sn}, c.RunArgs()...), ref, "warm-"+sn, "echo")...); err != nil {
			t.Fatal(err)
		}
	}
	times := map[string][]time.Duration{}
	ps0, pc0 := opAvg("prepare")
	rs0, rc0 := opAvg("remove")
	cs0, cc0 := opAvg("cleanup")
	for r := 0; r < reps; r++ {
		order := []string{"dupsnap", "overlayfs"}
		if r%2 == 1 {
			order = []string{"overlayfs", "dupsnap"}
		}
		for _, sn := range order {
			args := append(append([]string{"run", "--rm", "--snapshotter", sn}, c.RunArgs()...), ref, fmt.Sprintf("s%d-%s", r, sn), "echo")
			t0 := time.Now()
			if err := ctr(time.Minute, args...); err != nil {
				t.Fatalf("%v\n%s", err, d.Tail())
			}
			times[sn] = append(times[sn], time.Since(t0))
		}
	}
	directPrepare(ctx, t, d, reps)
	ps1, pc1 := opAvg("prepare")
	rs1, rc1 := opAvg("remove")
	cs1, cc1 := opAvg("cleanup")
	avgMs := func(s, c float64) float64 { return s / max(c, 1) * 1e3 }
	t.Logf("dupsnap daemon, timed runs: Prepare avg %.1f ms (%v), Remove avg %.1f ms (%v), Cleanup avg %.1f ms (%v)",
		avgMs(ps1-ps0, pc1-pc0), pc1-pc0, avgMs(rs1-rs0, rc1-rc0), rc1-rc0, avgMs(cs1-cs0, cc1-cc0), cc1-cc0)
	// Where a server's start goes: its own log, of kept containers.
	for i := 0; i < 3; i++ {
		id := fmt.Sprintf("keep%d", i)
		if err := ctr(time.Minute, append(append([]string{"run", "-d", "--snapshotter", "dupsnap"}, c.RunArgs()...), ref, id, "sleep", "30")...); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			c.Ctr(context.Background(), 30*time.Second, "task", "kill", "-s", "9", id)
			c.Ctr(context.Background(), 30*time.Second, "task", "rm", "-f", id)
			c.Ctr(context.Background(), 30*time.Second, "container", "rm", id)
		})
	}
	// Idle RSS of the kept containers' servers, after their delayed
	// FreeOSMemory (2 s).
	time.Sleep(2500 * time.Millisecond)
	pids, _ := filepath.Glob(filepath.Join(d.Root, "snapshots", "*", "rootfs.pid"))
	// CPU time of the servers (since they were spares) and of the
	// waiting spare: what runs beside a container's start.
	cpuOf := func(pid string) string {
		b, err := os.ReadFile("/proc/" + pid + "/stat")
		if err != nil {
			return "?"
		}
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
		if len(f) < 13 {
			return "?"
		}
		u, _ := strconv.Atoi(f[11])
		s, _ := strconv.Atoi(f[12])
		return fmt.Sprintf("user %dms sys %dms", u*10, s*10)
	}
	for _, f := range pids {
		b, _ := os.ReadFile(f)
		t.Logf("server %s CPU: %s", strings.TrimSpace(string(b)), cpuOf(strings.TrimSpace(string(b))))
	}
	if out, err := exec.Command("pgrep", "-f", "rootfs --spare --for "+filepath.Join(d.Root, "cas")).Output(); err == nil {
		for _, pid := range strings.Fields(string(out)) {
			t.Logf("spare %s CPU: %s", pid, cpuOf(pid))
		}
	}
	for _, f := range pids {
		b, _ := os.ReadFile(f)
		st, _ := os.ReadFile("/proc/" + strings.TrimSpace(string(b)) + "/status")
		for _, l := range strings.Split(string(st), "\n") {
			if strings.HasPrefix(l, "VmRSS:") || strings.HasPrefix(l, "RssAnon:") {
				t.Logf("idle server %s %s", strings.TrimSpace(string(b)), strings.Join(strings.Fields(l), " "))
			}
		}
	}
	if os.Getenv("DUPSNAP_MEASURE_STATS") != "" {
		// FUSE requests of a container's start (published every 5 s).
		time.Sleep(6 * time.Second)
		stats, _ := filepath.Glob(filepath.Join(d.Root, "snapshots", "*", "rootfs.stats"))
		for _, f := range stats {
			b, _ := os.ReadFile(f)
			t.Logf("%s: %s", f, b)
		}
	}
	logs, _ := filepath.Glob(filepath.Join(d.Root, "snapshots", "*", "rootfs.log"))
	for _, f := range logs {
		b, _ := os.ReadFile(f)
		for _, l := range strings.Split(string(b), "\n") {
			if strings.Contains(l, "rootfs: serving") {
				t.Logf("server: %s", l[strings.Index(l, "msg="):])
			}
		}
	}
	md, mo := median(times["dupsnap"]), median(times["overlayfs"])
	phs := prepPhases(d.LogFile)
	srv := phs["servers"]
	phs["stop"] = stopTimes(d.LogFile)
	phs["rootfs.Start"] = tookTimes(d.LogFile, "rootfs server started")
	for _, name := range []string{"lookup", "metastore", "servers", "rootfs.Start", "stop"} {
		t.Logf("dupsnap %s: median %v of %d", name, median(phs[name]).Round(10*time.Microsecond), len(phs[name]))
	}
	t.Logf("MEASURE container start+exit (ctr run --rm, %d files, %d reps): dupsnap %v %v vs overlayfs %v %v: %.2fx (goal <= 1.2x); dupsnap Prepare starting the rootfs server: median %v of %d; load %s",
		nfiles, reps, md.Round(100*time.Microsecond), round(times["dupsnap"]), mo.Round(100*time.Microsecond), round(times["overlayfs"]),
		float64(md)/float64(mo), median(srv).Round(100*time.Microsecond), len(srv), loadAvg())
}

// directPrepare times Prepare+Remove of a container snapshot on the
// image's top layer straight through dupsnap's gRPC socket (what
// containerd's proxy does, without containerd): the client's view of a
// Prepare, beside the daemon's own (its log).
func directPrepare(ctx context.Context, t *testing.T, d *harness.Dupsnap, reps int) {
	sn, closeFn, err := d.Client()
	if err != nil {
		t.Logf("direct prepare: %v", err)
		return
	}
	defer closeFn()
	parents := map[string]bool{}
	var committed []string
	sn.Walk(ctx, func(_ context.Context, i snapshots.Info) error {
		if i.Kind == snapshots.KindCommitted {
			committed = append(committed, i.Name)
			parents[i.Parent] = true
		}
		return nil
	})
	top := ""
	for _, c := range committed {
		if !parents[c] {
			top = c
		}
	}
	if top == "" {
		return
	}
	var prep, mnt, rm []time.Duration
	failed := 0
	for i := 0; i < reps; i++ {
		key := fmt.Sprintf("direct-%d", i)
		t0 := time.Now()
		// containerd's garbage collector removes snapshots it does not
		// know, such as these, whenever it runs (even one still
		// starting): errors are counted, not fatal.
		if _, err := sn.Prepare(ctx, key, top); err != nil {
			failed++
			sn.Remove(ctx, key)
			continue
		}
		prep = append(prep, time.Since(t0))
		time.Sleep(50 * time.Millisecond) // the spare's refill
		t0 = time.Now()
		if _, err := sn.Mounts(ctx, key); err == nil {
			mnt = append(mnt, time.Since(t0))
		}
		t0 = time.Now()
		if err := sn.Remove(ctx, key); err != nil {
			failed++
			continue
		}
		rm = append(rm, time.Since(t0))
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("direct gRPC (no containerd; %d calls lost to its GC): Prepare median %v %v, Mounts median %v, Remove median %v %v",
		failed, median(prep).Round(10*time.Microsecond), round(prep), median(mnt).Round(10*time.Microsecond), median(rm).Round(10*time.Microsecond), round(rm))
}

// startImage is shaped like the bench image: base, many small /usr files,
// a data layer and a small top layer.
func startImage(t *testing.T, nfiles int) v1.Image {
	t.Helper()
	base, err := harness.BaseFiles()
	if err != nil {
		t.Fatal(err)
	}
	usr, err := harness.HostFiles([]string{"/usr/share", "/usr/lib"}, nfiles, 64<<10, 48<<20)
	if err != nil {
		t.Fatal(err)
	}
	data, err := harness.HostFiles([]string{"/usr/bin"}, 300, 1<<20, 16<<20)
	if err != nil {
		t.Fatal(err)
	}
	var layers []v1.Layer
	for _, fs := range [][]harness.File{base, harness.Relocate(usr, "opt/usr"), harness.Relocate(data, "opt/bin"), {{Path: "etc/extra", Data: []byte("x\n")}}} {
		l, err := harness.Layer(fs)
		if err != nil {
			t.Fatal(err)
		}
		layers = append(layers, l)
	}
	img, err := harness.Image([]string{"/bin/sh"}, layers...)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

var phaseRe = regexp.MustCompile(`(\w+)=([0-9.]+[a-zµ]+)`)

// prepPhases are the per-phase durations dupsnap logged for rootfs
// Prepares (mode 0), by phase name.
func prepPhases(logFile string) map[string][]time.Duration {
	b, err := os.ReadFile(logFile)
	if err != nil {
		return nil
	}
	out := map[string][]time.Duration{}
	for _, l := range strings.Split(string(b), "\n") {
		i := strings.Index(l, "phases=\"")
		if !strings.Contains(l, "snapshot created") || !strings.Contains(l, "mode=0") || i < 0 {
			continue
		}
		ph := l[i+len("phases=\""):]
		ph = ph[:strings.IndexByte(ph+"\"", '"')]
		for _, m := range phaseRe.FindAllStringSubmatch(ph, -1) {
			if d, err := time.ParseDuration(m[2]); err == nil {
				out[m[1]] = append(out[m[1]], d)
			}
		}
	}
	return out
}

// stopTimes are the durations dupsnap logged for stopping rootfs servers.
func stopTimes(logFile string) []time.Duration { return tookTimes(logFile, "rootfs server stopped") }

// tookTimes are the took= durations of the daemon's log lines with msg.
func tookTimes(logFile, msg string) []time.Duration {
	b, _ := os.ReadFile(logFile)
	var out []time.Duration
	for _, l := range strings.Split(string(b), "\n") {
		i := strings.Index(l, msg)
		j := strings.Index(l, "took=")
		if i < 0 || j < 0 {
			continue
		}
		f := strings.Fields(l[j+len("took="):])
		if len(f) > 0 {
			if d, err := time.ParseDuration(f[0]); err == nil {
				out = append(out, d)
			}
		}
	}
	return out
}

func round(ds []time.Duration) []time.Duration {
	out := make([]time.Duration, len(ds))
	for i, d := range ds {
		out[i] = d.Round(time.Millisecond)
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

func loadAvg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}
