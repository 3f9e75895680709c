package rootfs

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// TestMeasure prints every rootfs benchmark of issues 3 and 4 next to
// overlayfs over the same files (the merged image extracted into its
// lower dir), same run, medians of measureReps fresh snapshots, with the
// ratio (> 1: dupsnap is better). With DUPSNAP_ROOTFS_MEASURE_JSON=path it
// also writes the results as JSON. Skipped unless DUPSNAP_ROOTFS_MEASURE=1
// (it moves a few GiB; about a minute).
func TestMeasure(t *testing.T) {
	needRoot(t)
	if os.Getenv("DUPSNAP_ROOTFS_MEASURE") == "" {
		t.Skip("set DUPSNAP_ROOTFS_MEASURE=1")
	}
	e := newEnv(t)
	var ents []tarEntry
	for d := 0; d < 100; d++ {
		ents = append(ents, tarEntry{name: fmt.Sprintf("usr/d%d/", d), typ: '5'})
		for f := 0; f < 30; f++ {
			ents = append(ents, tarEntry{name: fmt.Sprintf("usr/d%d/f%d", d, f), body: fmt.Sprintf("%d-%d", d, f)})
		}
	}

	ents = append(ents, tarEntry{name: "big", body: strings.Repeat("0123456789abcdef", measureBig/16)},
		tarEntry{name: "rand", body: strings.Repeat("fedcba9876543210", measureBig/16)})
	layer := e.addLayer(t, makeTar(t, ents))
	ents = nil
	bin := dupsnapBin(t)

	lower := extractLower(t, e, []digest.Digest{layer})

	var res measureResults
	for rep := 0; rep < measureReps; rep++ {
		measureRep(t, e, bin, layer, lower, rep, &res)
		if t.Failed() {
			return
		}
	}
	res.report(t)
}

const (
	measureReps = 3
	walkN       = 3101 // entries under usr
)

// measureRep runs every workload once on a fresh active dupsnap snapshot
// and a fresh overlayfs upper. Which goes first alternates per rep.
func measureRep(t *testing.T, e *env, bin string, layer digest.Digest, lower string, rep int, res *measureResults) {
	dir := filepath.Join(e.dir, fmt.Sprint("rep", rep))
	start := func(name string, plain bool) (Config, int, func()) {
		cfg := Config{Mountpoint: filepath.Join(dir, name, "rootfs"), CASRoot: e.cas.Root(),
			ManifestRoot: filepath.Join(e.dir, "manifests"), Layers: []digest.Digest{layer},
			StateDir: filepath.Join(dir, name, "state"), PlainNewFiles: plain}
		os.MkdirAll(cfg.Mountpoint, 0o755)
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		pid, err := Start(ctx, bin, cfg, filepath.Join(dir, name+".log"))
		if err != nil {
			t.Fatal(err)
		}
		stopped := false
		stop := func() {
			if stopped {
				return
			}
			stopped = true
			sctx, c := context.WithTimeout(context.Background(), 10*time.Second)
			defer c()
			Stop(sctx, cfg.Mountpoint)
			syscall.Kill(pid, syscall.SIGKILL)
			forceUnmount(cfg.Mountpoint)
		}
		t.Cleanup(stop)
		return cfg, pid, stop
	}
	dup, pid, stopDup := start("dupsnap", false)
	plain, _, stopPlain := start("plain", true)
	if rep == 0 {
		time.Sleep(300 * time.Millisecond)
		res.single("idle_rss_fresh_kib", "KiB", rssKiB(pid), 16<<10, "issue 4: RSS of one idle rootfs server (goal <= 16 MiB)")
		res.single("idle_rss_fresh_anon_kib", "KiB", rssAnonKiB(pid), 16<<10, "the same without the (shared) binary text")
	}
	ovl := filepath.Join(dir, "ovl", "rootfs")
	unmountOvl := overlayAt(t, lower, ovl)
	d, o := dup.Mountpoint, ovl

	// both runs fn on the two roots, overlayfs first on even reps.
	both := func(fn func(root string) float64) (dv, ov float64) {
		if rep%2 == 0 {
			ov = fn(o)
			dv = fn(d)
		} else {
			dv = fn(d)
			ov = fn(o)
		}
		return
	}
	add := func(name, unit string, better int, goal float64, what string, fn func(root string) float64) {
		dv, ov := both(fn)
		res.add(name, unit, better, goal, what, dv, ov)
	}

	// Issue 3: unmodified image files (passthrough vs overlayfs lower), warm.
	both(func(r string) float64 { return seqRead(t, filepath.Join(r, "big"), measureBig) }) // warm-up
	add("clean_seq_read", "MB/s", higherBetter, 0.95, "issue 3: warm sequential read of an unmodified 256 MiB image file",
		func(r string) float64 { return seqRead(t, filepath.Join(r, "big"), measureBig) })
	add("clean_rand_read", "MB/s", higherBetter, 0.9, "issue 3: warm random 4 KiB reads of an unmodified 256 MiB image file",
		func(r string) float64 { return randRead(t, filepath.Join(r, "big"), measureBig, int64(rep)) })
	add("walk_lstat", "entries/s", higherBetter, 0.7, "issue 3: warm walk+lstat of 3100 entries under /usr",
		func(r string) float64 { return walkUsr(t, r, walkN) })

	// Issue 4: 4 KiB overwrite in the middle of a 256 MiB image file.
	add("overwrite_4k_time", "ms", lowerBetter, 50, "issue 4: open+4 KiB write+close in a 256 MiB image file (copy-up for overlayfs)",
		func(r string) float64 { return float64(overwrite4K(t, filepath.Join(r, "big"))) / 1e6 })
	syncfs(t, d)
	syncfs(t, o)
	usage, _, err := Usage(dup)
	if err != nil {
		t.Fatal(err)
	}
	res.add("overwrite_4k_extra_disk", "KiB", lowerBetter, 0, "issue 4: extra disk after the 4 KiB overwrite (goal <= 1 MiB)",
		float64(usage)/1024, duKiB(ovl+"-u"))

	// Random writes over a large image file, then reads of it, partly modified.
	add("rand_write", "MB/s", higherBetter, 1.0, "issue 4: open+2048 random 4 KiB writes+fsync of a 256 MiB image file, copy-up included",
		func(r string) float64 { return randWrite(t, filepath.Join(r, "rand"), int64(rep)) })
	add("modified_seq_read_first", "MB/s", higherBetter, 0.8, "issue 4: first sequential read of the partly modified file after reopen",
		func(r string) float64 { return seqRead(t, filepath.Join(r, "rand"), measureBig) })
	add("modified_seq_read", "MB/s", higherBetter, 0.8, "issue 4: warm sequential read of the partly modified file",
		func(r string) float64 { return seqRead(t, filepath.Join(r, "rand"), measureBig) })
	add("modified_rand_read", "MB/s", higherBetter, 0.8, "issue 4: random 4 KiB reads of the partly modified file",
		func(r string) float64 { return randRead(t, filepath.Join(r, "rand"), measureBig, int64(rep)+100) })

	// New files: many small ones and one large one; the large one read back.
	newFiles := func(pre string, root string) {
		v := smallFiles(t, root)
		res.addOne(pre+"small_files", root == o, v)
		v = largeFile(t, filepath.Join(root, "new"))
		res.addOne(pre+"large_file_write", root == o, v)
		v = seqRead(t, filepath.Join(root, "new"), measureBig)
		res.addOne(pre+"large_file_read_first", root == o, v)
		v = seqRead(t, filepath.Join(root, "new"), measureBig)
		res.addOne(pre+"large_file_read", root == o, v)
	}
	res.define("small_files", "files/s", higherBetter, 0.8, "issue 4: create+write+close 1000 new 4 KiB files in 10 new dirs")
	res.define("large_file_write", "MB/s", higherBetter, 0.8, "issue 4: new 256 MiB file, 1 MiB writes + fsync")
	res.define("large_file_read_first", "MB/s", higherBetter, 0.8, "issue 4: new 256 MiB file, first read after reopen")
	res.define("large_file_read", "MB/s", higherBetter, 0.8, "issue 4: new 256 MiB file, second read")
	for _, m := range []string{"small_files", "large_file_write", "large_file_read_first", "large_file_read"} {
		res.define("plain_"+m, res.defs[m].Unit, higherBetter, 0, "PlainNewFiles=true (passthrough backing files), "+strings.TrimPrefix(res.defs[m].What, "issue 4: "))
	}
	if rep%2 == 0 {
		newFiles("", o)
		newFiles("", d)
	} else {
		newFiles("", d)
		newFiles("", o)
	}
	// The plain-backing-file variant, against the overlayfs figures of this rep.
	pv := func(m string) []float64 { return res.byName[m].Overlayfs }
	for _, m := range []string{"small_files", "large_file_write", "large_file_read_first", "large_file_read"} {
		res.addOne("plain_"+m, true, pv(m)[len(pv(m))-1])
	}
	newFiles("plain_", plain.Mountpoint)

	if rep == measureReps-1 {
		time.Sleep(5 * time.Second) // two sync ticks: memory of the bursts is handed back
		res.single("idle_rss_after_kib", "KiB", rssKiB(pid), 16<<10, "issue 4: RSS of the dupsnap server idle after all the runs above")
		res.single("idle_rss_after_anon_kib", "KiB", rssAnonKiB(pid), 16<<10, "the same without the (shared) binary text")
	}
	stopDup()
	stopPlain()
	unmountOvl()
	os.RemoveAll(dir) // a GiB or so of uppers and regions
}

// rssKiB is VmRSS of pid; rssAnonKiB without the binary's text (RssFile),
// which every rootfs server shares.
func rssKiB(pid int) float64     { return procStatus(pid, "VmRSS:") }
func rssAnonKiB(pid int) float64 { return procStatus(pid, "RssAnon:") }

func procStatus(pid int, key string) float64 {
	st, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, l := range strings.Split(string(st), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == key {
			var v float64
			fmt.Sscan(f[1], &v)
			return v
		}
	}
	return 0
}

const (
	higherBetter = 1
	lowerBetter  = -1
)

// measureResult is one benchmark: per-rep figures of both filesystems,
// their medians and the ratio (> 1: dupsnap better, whatever the unit).
type measureResult struct {
	Name      string    `json:"name"`
	What      string    `json:"what"`
	Unit      string    `json:"unit"`
	Better    string    `json:"better"` // "higher" or "lower"
	Goal      float64   `json:"goal,omitempty"`
	Dupsnap   []float64 `json:"dupsnap_reps"`
	Overlayfs []float64 `json:"overlayfs_reps,omitempty"`
	DMedian   float64   `json:"dupsnap"`
	OMedian   float64   `json:"overlayfs,omitempty"`
	Ratio     float64   `json:"ratio,omitempty"`
	Met       *bool     `json:"met,omitempty"`
	better    int
	single    bool
}

type measureResults struct {
	order  []string
	byName map[string]*measureResult
	defs   map[string]*measureResult
}

func (m *measureResults) define(name, unit string, better int, goal float64, what string) *measureResult {
	if m.byName == nil {
		m.byName, m.defs = map[string]*measureResult{}, map[string]*measureResult{}
	}
	if r := m.byName[name]; r != nil {
		return r
	}
	b := "higher"
	if better < 0 {
		b = "lower"
	}
	r := &measureResult{Name: name, What: what, Unit: unit, Better: b, Goal: goal, better: better}
	m.byName[name], m.defs[name] = r, r
	m.order = append(m.order, name)
	return r
}

func (m *measureResults) add(name, unit string, better int, goal float64, what string, d, o float64) {
	r := m.define(name, unit, better, goal, what)
	r.Dupsnap = append(r.Dupsnap, d)
	r.Overlayfs = append(r.Overlayfs, o)
}

func (m *measureResults) addOne(name string, ovl bool, v float64) {
	r := m.byName[name]
	if ovl {
		r.Overlayfs = append(r.Overlayfs, v)
	} else {
		r.Dupsnap = append(r.Dupsnap, v)
	}
}

func (m *measureResults) single(name, unit string, v, goal float64, what string) {
	r := m.define(name, unit, lowerBetter, goal, what)
	r.single = true
	r.Dupsnap = append(r.Dupsnap, v)
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func (m *measureResults) report(t *testing.T) {
	var out []*measureResult
	for _, name := range m.order {
		r := m.byName[name]
		r.DMedian, r.OMedian = median(r.Dupsnap), median(r.Overlayfs)
		switch {
		case r.single:
			met := r.DMedian <= r.Goal
			r.Met = &met
			t.Logf("%-26s dupsnap %10.1f %-9s goal <= %g: %v   (%s)", r.Name, r.DMedian, r.Unit, r.Goal, met, r.What)
			out = append(out, r)
			continue
		case r.DMedian > 0 && r.OMedian > 0:
			r.Ratio = r.DMedian / r.OMedian
			if r.better < 0 {
				r.Ratio = r.OMedian / r.DMedian
			}
		}
		goal := ""
		if r.Goal > 0 {
			met := r.Ratio >= r.Goal
			r.Met = &met
			goal = fmt.Sprintf("goal >= %gx: %v", r.Goal, met)
		}
		t.Logf("%-26s dupsnap %10.1f  overlayfs %10.1f %-9s ratio %7.2fx  %s   (%s; reps dupsnap %v overlayfs %v)",
			r.Name, r.DMedian, r.OMedian, r.Unit, r.Ratio, goal, r.What, fmtReps(r.Dupsnap), fmtReps(r.Overlayfs))
		out = append(out, r)
	}
	if p := os.Getenv("DUPSNAP_ROOTFS_MEASURE_JSON"); p != "" {
		b, _ := json.MarshalIndent(map[string]any{"reps": measureReps, "results": out, "time": time.Now().UTC().Format(time.RFC3339)}, "", "  ")
		if err := os.WriteFile(p, append(b, '\n'), 0o644); err != nil {
			t.Errorf("write %s: %v", p, err)
		}
	}
}

func fmtReps(v []float64) string {
	s := make([]string, len(v))
	for i, x := range v {
		s[i] = fmt.Sprintf("%.1f", x)
	}
	return "[" + strings.Join(s, " ") + "]"
}
