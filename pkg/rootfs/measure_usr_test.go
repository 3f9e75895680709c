package rootfs

import (
	"context"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// TestMeasureUsr runs the benchmark's in-container workload (inctr reads:
// warm pass, then lstat walk and sequential read of ~5000 files of this
// machine's /usr) on a writable rootfs served by a real server process and
// on overlayfs over the same tree, alternating, and prints medians, ratios
// and the server's per-operation counts. Skipped unless
// DUPSNAP_ROOTFS_MEASURE_USR is set to the path of an inctr binary
// (CGO_ENABLED=0 go build -o /tmp/inctr ./integration/cmd/benchreport/inctr).
// DUPSNAP_MEASURE_PTMIN sets Config.PassthroughMinSize (default: the
// package default), DUPSNAP_MEASURE_REPS the repetitions (5),
// DUPSNAP_MEASURE_INPROC=1 serves in the test process (for -cpuprofile),
// DUPSNAP_MEASURE_OPENS=1 also times open(+read)+close per file, and
// DUPSNAP_MEASURE_WRAP="cmd args" runs inctr as "cmd args <root name>
// inctr ..." (e.g. a tracer). DUPSNAP_MEASURE_AB="KEY=VALUE" also runs a
// second server with that variable in its environment in every rep (an
// A/B in the same run; e.g. DUPSNAP_ROOTFS_NO_ATTR_REFRESH=1).
func TestMeasureUsr(t *testing.T) {
	needRoot(t)
	inctr := os.Getenv("DUPSNAP_ROOTFS_MEASURE_USR")
	if inctr == "" {
		t.Skip("set DUPSNAP_ROOTFS_MEASURE_USR=/path/to/inctr")
	}
	reps := 5
	if v, err := strconv.Atoi(os.Getenv("DUPSNAP_MEASURE_REPS")); err == nil {
		reps = v
	}
	e := newEnv(t)
	ents := []tarEntry{{name: "usr/", typ: '5'}, {name: "big", body: strings.Repeat("0123456789abcdef", 1<<20)}}
	seen := map[string]bool{"usr": true}
	var n int
	var total int64
	stop := fmt.Errorf("enough")
	// The files benchreport puts in its bench image (harness.HostFiles).
	for _, d := range []string{"/usr/share", "/usr/lib"} {
		err := filepath.WalkDir(d, func(p string, de fs.DirEntry, err error) error {
			if err != nil || !de.Type().IsRegular() {
				return nil
			}
			info, err := de.Info()
			if err != nil || info.Size() > 1<<20 || info.Mode()&0o444 == 0 {
				return nil
			}
			if n >= 5000 || total+info.Size() > 96<<20 {
				return stop
			}
			b, err := os.ReadFile(p)
			if err != nil {
				return nil
			}
			rel := strings.TrimPrefix(p, "/")
			for dir := filepath.Dir(rel); !seen[dir]; dir = filepath.Dir(dir) {
				seen[dir] = true
				ents = append(ents, tarEntry{name: dir + "/", typ: '5'})
			}
			ents = append(ents, tarEntry{name: rel, body: string(b)})
			n++
			total += info.Size()
			return nil
		})
		if err == stop {
			break
		}
	}
	sort.SliceStable(ents, func(i, j int) bool { return ents[i].name < ents[j].name })
	layer := e.addLayer(t, makeTar(t, ents))
	ents = nil
	t.Logf("%d files, %d MiB", n, total>>20)

	lower := extractLower(t, e, []digest.Digest{layer})

	bin := dupsnapBin(t)
	ptMin := int64(-1)
	if v, err := strconv.ParseInt(os.Getenv("DUPSNAP_MEASURE_PTMIN"), 10, 64); err == nil {
		ptMin = v
	}
	run := func(root string) map[string]float64 {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		args := []string{inctr, "reads", filepath.Join(root, "big"), filepath.Join(root, "usr")}
		if w := os.Getenv("DUPSNAP_MEASURE_WRAP"); w != "" {
			args = append(strings.Fields(w+" "+filepath.Base(filepath.Dir(root))), args...) // e.g. a profiler
		}
		out, err := exec.CommandContext(ctx, args[0], args[1:]...).Output()
		if err != nil {
			t.Fatalf("inctr on %s: %v", root, err)
		}
		m := map[string]float64{}
		if err := json.Unmarshal(out, &m); err != nil {
			t.Fatal(err)
		}
		return m
	}
	res := map[string][3][]float64{}
	ab := os.Getenv("DUPSNAP_MEASURE_AB")
	addRes := func(i int, m map[string]float64) {
		for _, k := range []string{"stat_s", "seq_files_mbps", "seq_big_mbps", "rand_big_mbps"} {
			v := res[k]
			v[i] = append(v[i], m[k])
			res[k] = v
		}
	}
	// runB serves a copy of cfg with k=v in the server's environment.
	runB := func(dir string, cfg Config, k, v string, last bool) map[string]float64 {
		cfgB := cfg
		cfgB.Mountpoint = filepath.Join(dir, "dupsnapB", "rootfs")
		cfgB.StateDir = filepath.Join(dir, "dupsnapB", "state")
		os.MkdirAll(cfgB.Mountpoint, 0o755)
		os.Setenv(k, v)
		startServer(t, bin, cfgB, filepath.Join(dir, "serverB.log"))
		os.Unsetenv(k)
		m := run(cfgB.Mountpoint)
		if last {
			var ds []string
			for i := 0; i < 3; i++ {
				t0 := time.Now()
				lstatWalk(t, filepath.Join(cfgB.Mountpoint, "usr"))
				ds = append(ds, time.Since(t0).Round(100*time.Microsecond).String())
			}
			t.Logf("walks again B: %v", ds)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		Stop(ctx, cfgB.Mountpoint)
		cancel()
		forceUnmount(cfgB.Mountpoint)
		return m
	}
	for rep := 0; rep < reps; rep++ {
		dir := filepath.Join(e.dir, fmt.Sprint("rep", rep))
		cfg := Config{Mountpoint: filepath.Join(dir, "dupsnap", "rootfs"), CASRoot: e.cas.Root(),
			ManifestRoot: filepath.Join(e.dir, "manifests"), Layers: []digest.Digest{layer},
			StateDir: filepath.Join(dir, "dupsnap", "state")}
		if ptMin >= 0 {
			cfg.PassthroughMinSize = &ptMin
		}
		os.MkdirAll(cfg.Mountpoint, 0o755)
		var stopInproc func()
		if os.Getenv("DUPSNAP_MEASURE_INPROC") != "" {
			stopInproc = serve(t, cfg) // for go test -cpuprofile
		} else {
			startServer(t, bin, cfg, filepath.Join(dir, "server.log"))
		}
		ovl := filepath.Join(dir, "ovl", "rootfs")
		overlayAt(t, lower, ovl)
		var d, o map[string]float64
		k, v, isAB := strings.Cut(ab, "=")
		if isAB && rep%2 == 1 {
			addRes(2, runB(dir, cfg, k, v, rep == reps-1))
		}
		if rep%2 == 0 {
			o, d = run(ovl), run(cfg.Mountpoint)
		} else {
			d, o = run(cfg.Mountpoint), run(ovl)
		}
		addRes(0, d)
		addRes(1, o)
		if isAB && rep%2 == 0 {
			addRes(2, runB(dir, cfg, k, v, rep == reps-1))
		}

		if rep == reps-1 {
			// Later walks: no first-listing GETATTRs left.
			for _, root := range []string{cfg.Mountpoint, ovl} {
				var ds []string
				for i := 0; i < 3; i++ {
					t0 := time.Now()
					filepath.WalkDir(filepath.Join(root, "usr"), func(p string, de fs.DirEntry, err error) error {
						os.Lstat(p)
						return nil
					})
					ds = append(ds, time.Since(t0).Round(100*time.Microsecond).String())
				}
				t.Logf("walks again %s: %v", filepath.Base(filepath.Dir(root)), ds)
			}
			if os.Getenv("DUPSNAP_MEASURE_OPENS") != "" {
				measureOpens(t, cfg.Mountpoint, ovl)
			}
		}
		if rep == reps-1 {
			time.Sleep(statsInterval + time.Second)
			st, err := ReadStats(cfg.Mountpoint)
			if err == nil {
				for op, s := range st.Ops {
					t.Logf("server op %-8s count %6d  mean %6.1f us", op, s.Count, s.Seconds/float64(s.Count)*1e6)
				}
			}
		}
		if stopInproc != nil {
			stopInproc()
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		Stop(ctx, cfg.Mountpoint)
		cancel()
		forceUnmount(cfg.Mountpoint)
		syscall.Unmount(ovl, syscall.MNT_DETACH)
	}
	load, _ := os.ReadFile("/proc/loadavg")
	t.Logf("load: %s", strings.TrimSpace(string(load)))
	for _, k := range []string{"stat_s", "seq_files_mbps", "seq_big_mbps", "rand_big_mbps"} {
		v := res[k]
		dm, om := median(v[0]), median(v[1])
		ratio := dm / om
		if k == "stat_s" {
			ratio = om / dm
		}
		t.Logf("%-15s dupsnap %9.4f  overlayfs %9.4f  ratio %.3f  (dupsnap %v overlayfs %v)", k, dm, om, ratio, fmtReps4(v[0]), fmtReps4(v[1]))
		if len(v[2]) > 0 {
			bm := median(v[2])
			ratio = bm / om
			if k == "stat_s" {
				ratio = om / bm
			}
			t.Logf("%-15s B(%s) %9.4f  ratio %.3f  %v", k, ab, bm, ratio, fmtReps4(v[2]))
		}
	}
}

// measureOpens times open+close and open+read+close of every file under
// usr on each root (per-file cost of the sequential read benchmark).
func measureOpens(t *testing.T, roots ...string) {
	buf := make([]byte, 1<<20)
	for _, root := range roots {
		var files []string
		filepath.WalkDir(filepath.Join(root, "usr"), func(p string, de fs.DirEntry, err error) error {
			if err == nil && de.Type().IsRegular() {
				files = append(files, p)
			}
			return nil
		})
		t0 := time.Now()
		for _, p := range files {
			fd, err := syscall.Open(p, syscall.O_RDONLY, 0)
			if err == nil {
				syscall.Close(fd)
			}
		}
		oc := time.Since(t0) / time.Duration(len(files))
		t0 = time.Now()
		for _, p := range files {
			fd, err := syscall.Open(p, syscall.O_RDONLY, 0)
			if err != nil {
				continue
			}
			for {
				n, _ := syscall.Read(fd, buf)
				if n <= 0 {
					break
				}
			}
			syscall.Close(fd)
		}
		orc := time.Since(t0) / time.Duration(len(files))
		t.Logf("per file %s: open+close %v, open+read+close %v", filepath.Base(filepath.Dir(root)), oc, orc)
	}
}

func fmtReps4(v []float64) string {
	s := make([]string, len(v))
	for i, x := range v {
		s[i] = strconv.FormatFloat(x, 'g', 4, 64)
	}
	return "[" + strings.Join(s, " ") + "]"
}
