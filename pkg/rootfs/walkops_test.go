package rootfs

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// walkImage is an env with one layer: d0..d5, each with sub0..sub3, each
// with 8 small files and one passthrough-sized file: 31 directories.
func walkImage(t *testing.T) (*env, []digest.Digest, int) {
	t.Helper()
	e := newEnv(t)
	ents := []tarEntry{{name: "usr/", typ: '5'}}
	dirs := 1
	for i := 0; i < 6; i++ {
		ents = append(ents, tarEntry{name: fmt.Sprintf("usr/d%d/", i), typ: '5'})
		dirs++
		for j := 0; j < 4; j++ {
			d := fmt.Sprintf("usr/d%d/sub%d/", i, j)
			ents = append(ents, tarEntry{name: d, typ: '5'})
			dirs++
			for k := 0; k < 8; k++ {
				ents = append(ents, tarEntry{name: fmt.Sprintf("%sf%d", d, k), body: strings.Repeat(fmt.Sprint(i, j, k), 300)})
			}
			ents = append(ents, tarEntry{name: d + "big", body: strings.Repeat(fmt.Sprint(i, j), 300<<10)})
		}
	}
	return e, []digest.Digest{e.addLayer(t, makeTar(t, ents))}, dirs
}

// statOps is the server's op counts, read from its stats file once they
// settled: two publications after now with the same counts (RELEASE and
// the refresher's GETATTRs come asynchronously).
func statOps(t *testing.T, mp string) map[string]uint64 {
	t.Helper()
	now := time.Now()
	deadline := now.Add(10 * time.Second)
	var last map[string]uint64
	var lastAt time.Time
	for {
		time.Sleep(statsInterval)
		st, err := ReadStats(mp)
		if err != nil && !os.IsNotExist(err) {
			t.Fatal(err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("op counts never settled: %v %v", st.Ops, err)
		}
		if err != nil || !st.Updated.After(now) || st.Updated.Equal(lastAt) {
			continue
		}
		m := map[string]uint64{}
		for op, s := range st.Ops {
			m[op] = s.Count
		}
		if last != nil && fmtOps(m) == fmtOps(last) && st.Updated.Sub(now) > 2*refreshDelay*25 {
			return m
		}
		last, lastAt = m, st.Updated
	}
}

func opsDelta(a, b map[string]uint64) map[string]uint64 {
	d := map[string]uint64{}
	for op, n := range b {
		if n != a[op] {
			d[op] = n - a[op]
		}
	}
	return d
}

func fmtOps(d map[string]uint64) string {
	var s []string
	for op, n := range d {
		s = append(s, fmt.Sprintf("%s=%d", op, n))
	}
	sort.Strings(s)
	return strings.Join(s, " ")
}

// lstatWalk is the benchmark's walk: WalkDir with an lstat of every entry.
func lstatWalk(t *testing.T, root string) (files []string) {
	t.Helper()
	err := filepath.WalkDir(root, func(p string, de fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if _, err := os.Lstat(p); err != nil {
			return err
		}
		if de.Type().IsRegular() {
			files = append(files, p)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return files
}

// A warm walk of an image tree (lstat of every entry, as benchreport's
// stat benchmark, after a first walk and a read of every file) sends the
// server nothing: listings come from the kernel's readdir cache and
// attributes from its attribute cache (refreshed off the walk's path after
// the first listing dropped the directories' atime, see refresh.go).
func TestWarmWalkOps(t *testing.T) {
	needRoot(t)
	old := statsInterval
	statsInterval = 20 * time.Millisecond
	t.Cleanup(func() { statsInterval = old })
	// The refresher is off by default (refresh.go): this checks what it
	// does when on.
	wasOn := refreshOn
	refreshOn = true
	t.Cleanup(func() { refreshOn = wasOn })
	e, layers, dirs := walkImage(t)
	for _, ro := range []bool{false, true} {
		t.Run(fmt.Sprint("readonly=", ro), func(t *testing.T) {
			cfg := activeCfg(e, layers)
			if ro {
				cfg = Config{Mountpoint: filepath.Join(e.dir, "view", "rootfs"), CASRoot: e.cas.Root(),
					ManifestRoot: filepath.Join(e.dir, "manifests"), Layers: layers, ReadOnly: true}
			}
			serve(t, cfg)
			root := filepath.Join(cfg.Mountpoint, "usr")
			prev := statOps(t, cfg.Mountpoint)
			phase := func(name string, fn func()) map[string]uint64 {
				fn()
				cur := statOps(t, cfg.Mountpoint)
				d := opsDelta(prev, cur)
				prev = cur
				t.Logf("%-8s %s", name, fmtOps(d))
				return d
			}
			var files []string
			phase("walk1", func() { files = lstatWalk(t, root) })
			phase("read", func() {
				for _, p := range files {
					if _, err := os.ReadFile(p); err != nil {
						t.Fatal(err)
					}
				}
			})
			w2 := phase("walk2", func() { lstatWalk(t, root) })
			w3 := phase("walk3", func() { lstatWalk(t, root) })
			t.Logf("%d dirs, %d files", dirs, len(files))
			for _, w := range []map[string]uint64{w2, w3} {
				// The kernel may reclaim a cached listing's pages under
				// memory pressure (fuse_readdir_cached then lists anew):
				// a few READDIRs are no error here, round trips per
				// directory or per file are.
				if w["readdir"] <= 4 {
					delete(w, "readdir")
				}
				if len(w) != 0 {
					t.Errorf("warm walk sent the server %s", fmtOps(w))
				}
			}
		})
	}
}

// TestMeasureOpens times open+close of every small image file, many times
// over, on an in-process server (for go test -cpuprofile). Skipped unless
// DUPSNAP_MEASURE_OPENCOST is set (the number of passes).
func TestMeasureOpens(t *testing.T) {
	needRoot(t)
	passes, _ := strconv.Atoi(os.Getenv("DUPSNAP_MEASURE_OPENCOST"))
	if passes <= 0 {
		t.Skip("set DUPSNAP_MEASURE_OPENCOST=passes")
	}
	e, layers, _ := walkImage(t)
	cfg := activeCfg(e, layers)
	serve(t, cfg)
	files := lstatWalk(t, filepath.Join(cfg.Mountpoint, "usr"))
	var small []string
	for _, p := range files {
		if filepath.Base(p) != "big" {
			small = append(small, p)
		}
	}
	t0 := time.Now()
	for i := 0; i < passes; i++ {
		for _, p := range small {
			fd, err := syscall.Open(p, syscall.O_RDONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			syscall.Close(fd)
		}
	}
	t.Logf("open+close: %v per file", time.Since(t0)/time.Duration(passes*len(small)))
	st, _ := ReadStats(cfg.Mountpoint)
	for op, s := range st.Ops {
		t.Logf("server op %-8s count %6d  mean %6.1f us", op, s.Count, s.Seconds/float64(s.Count)*1e6)
	}
}

// statBeneath never follows a symlink, not even to a place beneath the
// root: a container could otherwise point the refresher at host paths.
func TestStatBeneathNoSymlinks(t *testing.T) {
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "d", "e"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/", filepath.Join(root, "up")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("d", filepath.Join(root, "down")); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"", "d", "d/e", "up"} { // "up" itself: O_NOFOLLOW stats the link
		if err := statBeneath(root, p); err != nil {
			t.Errorf("statBeneath(%q): %v", p, err)
		}
	}
	for _, p := range []string{"up/etc", "down/e", "../" + filepath.Base(root), "/etc"} {
		if err := statBeneath(root, p); err == nil {
			t.Errorf("statBeneath(%q) resolved; want an error", p)
		}
	}
}
