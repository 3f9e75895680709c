package rootfs

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// TestMeasureCreate isolates the benchmark's "create many small files and
// one large file" row (inctr create: 2000 new 4 KiB files, then one new
// 64 MiB file in 1 MiB writes, no fsync) on a fresh dupsnap rootfs (real
// server process, fresh region, as in a container) and on overlayfs, in
// alternating order, and prints medians plus, per dupsnap run, the 1 MiB
// write latencies (median, max, the slow ones with their time offset), so
// stalls can be matched with the server's sync tick. Skipped unless
// DUPSNAP_MEASURE_CREATE=1; DUPSNAP_MEASURE_CREATE_REPS (default 6),
// _MB (64), _SMALL (2000), _GAP (ms slept between the small files and the
// large one, default 0), _DIRTY (MiB written to a scratch file on the same
// filesystem right before each run and fsync'd while it runs: writeback
// like that of what the benchmark wrote before, e.g. overlayfs's 256 MiB
// copy-up), _BIN_B=path (also run that server binary: A/B; with
// _BIN_B=$DUPSNAP_BIN and _NICE=n, the B server runs at nice n),
// _HOGS=n (n busy-looping processes while each run goes: a loaded node,
// where every FUSE round trip waits for a CPU), _PERF=path (perf record
// -g of the server during each dupsnap run, to path.NAME.REP;
// _PERF_ARGS="-q -g -e sched:sched_switch" shows where its threads
// block), _OPS=1 (the server's request counts after the run), _DEBUG=1
// (the server's request log around the second small file).
func TestMeasureCreate(t *testing.T) {
	needRoot(t)
	if os.Getenv("DUPSNAP_MEASURE_CREATE") == "" {
		t.Skip("set DUPSNAP_MEASURE_CREATE=1")
	}
	reps, mb, small, gap := 6, 64, 2000, 0
	fmt.Sscan(os.Getenv("DUPSNAP_MEASURE_CREATE_REPS"), &reps)
	fmt.Sscan(os.Getenv("DUPSNAP_MEASURE_CREATE_MB"), &mb)
	fmt.Sscan(os.Getenv("DUPSNAP_MEASURE_CREATE_SMALL"), &small)
	fmt.Sscan(os.Getenv("DUPSNAP_MEASURE_CREATE_GAP"), &gap)
	dirty := 0
	fmt.Sscan(os.Getenv("DUPSNAP_MEASURE_CREATE_DIRTY"), &dirty)
	prof := os.Getenv("DUPSNAP_MEASURE_CREATE_PERF")
	hogs := 0
	fmt.Sscan(os.Getenv("DUPSNAP_MEASURE_CREATE_HOGS"), &hogs)
	e := newEnv(t)
	layer := e.addLayer(t, makeTar(t, []tarEntry{{name: "etc/", typ: '5'}, {name: "etc/hosts", body: "x"}}))
	bin := dupsnapBin(t)
	lower := extractLower(t, e, []digest.Digest{layer})

	// Variants: overlayfs, dupsnap, and with _BIN_B=path a second server
	// binary ("dupsnapB", A/B in one run); each dupsnap run gets a fresh
	// server and region, as a new container does.
	variants := []string{"overlay", "dupsnap"}
	binB := os.Getenv("DUPSNAP_MEASURE_CREATE_BIN_B")
	if binB != "" {
		variants = append(variants, "dupsnapB")
	}
	res := map[string][]float64{}
	for rep := 0; rep < reps; rep++ {
		dir := filepath.Join(e.dir, fmt.Sprint("rep", rep))
		ovl := filepath.Join(dir, "ovl", "rootfs")
		overlayAt(t, lower, ovl)
		one := func(name string) {
			root, pid := ovl, 0
			var cfg Config
			if name != "overlay" {
				cfg = Config{Mountpoint: filepath.Join(dir, name, "rootfs"), CASRoot: e.cas.Root(),
					ManifestRoot: filepath.Join(e.dir, "manifests"), Layers: []digest.Digest{layer},
					StateDir: filepath.Join(dir, name, "state"), Debug: os.Getenv("DUPSNAP_MEASURE_CREATE_DEBUG") != ""}
				os.MkdirAll(cfg.Mountpoint, 0o755)
				b := bin
				if name == "dupsnapB" {
					b = binB
				}
				pid = startServer(t, b, cfg, filepath.Join(dir, name+".log"))
				if v := os.Getenv("DUPSNAP_MEASURE_CREATE_NICE"); v != "" && name == "dupsnapB" {
					// Experiment: the B server's threads at this nice value.
					var nice int
					fmt.Sscan(v, &nice)
					des, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
					for _, de := range des {
						var tid int
						fmt.Sscan(de.Name(), &tid)
						syscall.Setpriority(syscall.PRIO_PROCESS, tid, nice)
					}
				}
				root = cfg.Mountpoint
				defer func() {
					syscall.Kill(pid, syscall.SIGKILL)
					forceUnmount(cfg.Mountpoint)
				}()
			}
			if hogs > 0 {
				defer cpuHogs(t, hogs)()
			}
			if dirty > 0 {
				f := scratchWrite(t, filepath.Join(dir, "scratch-"+name), dirty)
				done := make(chan struct{})
				go func() { f.Sync(); f.Close(); close(done) }() // writeback while the workload runs
				defer func() { <-done }()
			}
			if prof != "" && pid != 0 {
				stop := perfRecord(t, pid, fmt.Sprintf("%s.%s.%d", prof, name, rep))
				defer stop()
			}
			sm, lg, lat := createWorkload(t, filepath.Join(root, "out"), small, mb, time.Duration(gap)*time.Millisecond)
			if pid != 0 && cfg.Debug {
				b, _ := os.ReadFile(filepath.Join(dir, name+".log"))
				if i := strings.Index(string(b), "f00001"); i >= 0 {
					t.Logf("%s server requests from the second file on:\n%s", name, string(b[max(0, i-300):min(len(b), i+3000)]))
				}
			}
			if pid != 0 && os.Getenv("DUPSNAP_MEASURE_CREATE_OPS") != "" {
				time.Sleep(statsInterval + time.Second) // the server publishes its counts
				if b, err := os.ReadFile(StatsPath(cfg.Mountpoint)); err == nil {
					var st Stats
					json.Unmarshal(b, &st)
					var ops []string
					for k, v := range st.Ops {
						if v.Count > 0 {
							ops = append(ops, fmt.Sprintf("%s=%d", k, v.Count))
						}
					}
					sort.Strings(ops)
					t.Logf("%s server ops: %s", name, strings.Join(ops, " "))
				}
			}
			res[name+" small files/s"] = append(res[name+" small files/s"], sm)
			res[name+" large MB/s"] = append(res[name+" large MB/s"], lg)
			if pid != 0 {
				var st syscall.Stat_t
				syscall.Stat(filepath.Join(cfg.regionDir(), "data"), &st)
				t.Logf("rep %d %s: small %.0f/s large %.0f MB/s %s; region data file %d MiB, %d MiB allocated%s", rep, name, sm, lg, lat, st.Size>>20, st.Blocks>>11, gcCycles(filepath.Join(dir, name+".log")))
			} else {
				t.Logf("rep %d overlay: small %.0f/s large %.0f MB/s %s", rep, sm, lg, lat)
			}
		}
		// Rotate the order so no variant always goes first.
		for i := range variants {
			one(variants[(rep+i)%len(variants)])
		}
		syscall.Unmount(ovl, syscall.MNT_DETACH)
		os.RemoveAll(dir)
	}
	var keys []string
	for k := range res {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&b, "%-24s median %8.0f  runs %.0f\n", k, median(res[k]), res[k])
	}
	if l, err := os.ReadFile("/proc/loadavg"); err == nil {
		fmt.Fprintf(&b, "load %s", l)
	}
	t.Log("\n" + b.String())
}

// createWorkload is inctr create (small files, then one large file with
// 1 MiB writes, no fsync) timing each large write; it returns files/s,
// the large file's MB/s and a summary of the write latencies.
func createWorkload(t *testing.T, dir string, n, mb int, gap time.Duration) (float64, float64, string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	small := make([]byte, 4096)
	t0 := time.Now()
	for i := 0; i < n; i++ {
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("f%05d", i)), small, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	sm := float64(n) / time.Since(t0).Seconds()
	time.Sleep(gap)
	chunk := make([]byte, 1<<20)
	for i := range chunk {
		chunk[i] = byte(i * 7)
	}
	lat := make([]time.Duration, 0, mb)
	var slow []string
	t1 := time.Now()
	f, err := os.Create(filepath.Join(dir, "large"))
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < mb; i++ {
		w := time.Now()
		if _, err := f.Write(chunk); err != nil {
			t.Fatal(err)
		}
		d := time.Since(w)
		lat = append(lat, d)
		if d > 5*time.Millisecond {
			slow = append(slow, fmt.Sprintf("#%d@%dms:%.1fms", i, w.Sub(t1).Milliseconds(), d.Seconds()*1e3))
		}
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	total := time.Since(t1)
	sort.Slice(lat, func(a, b int) bool { return lat[a] < lat[b] })
	s := fmt.Sprintf("(writes: median %.2fms max %.1fms total %.0fms; slow %v)", lat[len(lat)/2].Seconds()*1e3,
		lat[len(lat)-1].Seconds()*1e3, total.Seconds()*1e3, slow)
	return sm, float64(mb) / total.Seconds(), s
}

// scratchWrite writes mb MiB to p without syncing it and returns it open;
// the caller syncs it in the background (writeback competing with the
// workload, like that of the overlayfs run before it in the benchmark).
func scratchWrite(t *testing.T, p string, mb int) *os.File {
	t.Helper()
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i)
	}
	for i := 0; i < mb; i++ {
		if _, err := f.Write(buf); err != nil {
			t.Fatal(err)
		}
	}
	return f
}

// cpuHogs starts n busy-looping shells; the returned func kills them.
func cpuHogs(t *testing.T, n int) func() {
	t.Helper()
	var cmds []*exec.Cmd
	stop := func() {
		for _, c := range cmds {
			c.Process.Kill()
			c.Wait()
		}
		cmds = nil
	}
	t.Cleanup(stop)
	for i := 0; i < n; i++ {
		c := exec.Command("sh", "-c", "while :; do :; done")
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		cmds = append(cmds, c)
	}
	time.Sleep(200 * time.Millisecond)
	return stop
}

// perfRecord samples pid with call graphs into out until the returned func.
func perfRecord(t *testing.T, pid int, out string) func() {
	t.Helper()
	perf, err := exec.LookPath("perf")
	if err != nil {
		t.Log("no perf: not profiling")
		return func() {}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	args := []string{"record", "-q", "-g", "-F", "2000"}
	if a := os.Getenv("DUPSNAP_MEASURE_CREATE_PERF_ARGS"); a != "" {
		args = append([]string{"record"}, strings.Fields(a)...) // e.g. "-q -g -e sched:sched_switch": where threads block
	}
	cmd := exec.CommandContext(ctx, perf, append(args, "-p", fmt.Sprint(pid), "-o", out)...)
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	stopped := false
	stop := func() {
		if !stopped {
			stopped = true
			cmd.Process.Signal(syscall.SIGINT)
			cmd.Wait()
			cancel()
		}
	}
	t.Cleanup(stop)
	return stop
}

// gcCycles reports how many GC cycles the server's log shows (with
// GODEBUG=gctrace=1 in the environment, which the server inherits).
func gcCycles(log string) string {
	b, err := os.ReadFile(log)
	if err != nil || !strings.Contains(os.Getenv("GODEBUG"), "gctrace") {
		return ""
	}
	n := 0
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "gc ") {
			n++
		}
	}
	return fmt.Sprintf("; server GC cycles so far: %d", n)
}
