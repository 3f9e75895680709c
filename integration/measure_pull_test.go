package integration

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/dupsnap/dupsnap/integration/harness"
)

// TestMeasurePull times `ctr image pull` of a few images with real
// duplication (shared base layer, the same files at other paths, an extra
// layer) through dupsnap (durable CAS) and through containerd's overlayfs
// snapshotter on the same containerd, alternating, DUPSNAP_MEASURE_REPS
// reps (default 3) with images removed and GC run between reps, and prints
// medians, the ratio and node disk. Gated: a measurement, not a check
// (DUPSNAP_MEASURE=1; DUPSNAP_MEASURE_UNPACKS sets max_concurrent_unpacks,
// default the harness's; DUPSNAP_MEASURE_MB the data layer's size, default
// 48; DUPSNAP_MEASURE_KEEP a dir to copy the daemons' logs to).
func TestMeasurePull(t *testing.T) {
	if os.Getenv("DUPSNAP_MEASURE") == "" {
		t.Skip("measurement; set DUPSNAP_MEASURE=1")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	reps := 3
	if n, err := strconv.Atoi(os.Getenv("DUPSNAP_MEASURE_REPS")); err == nil && n > 0 {
		reps = n
	}
	unpacks, _ := strconv.Atoi(os.Getenv("DUPSNAP_MEASURE_UNPACKS"))

	harness.Require(t, harness.DupsnapBin())
	dir := harness.TempDir(t, "dsmeas-")
	// dupsnap gets a root of its own so that du sees only its data; grace 1ns
	// so that a removed layer is really gone before the next rep.
	if err := os.MkdirAll(filepath.Join(dir, "ds"), 0o755); err != nil {
		t.Fatal(err)
	}
	d := harness.StartDupsnap(ctx, t, filepath.Join(dir, "ds"), "[gc]\ngrace = \"1ns\"\n")
	c := harness.StartContainerd(ctx, t, dir, harness.ContainerdOptions{DupsnapSocket: d.Socket, DupsnapRoot: d.Root, MaxConcurrentUnpacks: unpacks})
	reg := harness.StartRegistry(ctx, t, dir)
	t.Cleanup(func() {
		if t.Failed() {
			t.Log(d.Tail())
			t.Log(harness.LogTail(c.LogFile, 30))
		}
	})

	var refs []string
	for i, img := range measureImages(t) {
		ref, err := reg.Push(ctx, fmt.Sprintf("meas/img%d:v1", i), img)
		if err != nil {
			t.Fatal(err)
		}
		refs = append(refs, ref)
	}
	ctr := func(timeout time.Duration, args ...string) {
		t.Helper()
		if out, err := c.Ctr(ctx, timeout, args...); err != nil {
			t.Fatalf("ctr %v: %v\n%s\n%s", args, err, out, d.Tail())
		}
	}
	pullAll := func(sn string) time.Duration {
		start := time.Now()
		for _, ref := range refs {
			ctr(3*time.Minute, "image", "pull", "--plain-http", "--snapshotter", sn, ref)
		}
		return time.Since(start)
	}
	removeAll := func() {
		for _, ref := range refs {
			ctr(time.Minute, "image", "rm", "--sync", ref)
		}
		ctr(time.Minute, "content", "prune", "references")
	}
	ovlDir := filepath.Join(dir, "root", "io.containerd.snapshotter.v1.overlayfs")
	var tDup, tOvl []time.Duration
	var duDup, duOvl int64
	for r := 0; r < reps; r++ {
		order := []string{"dupsnap", "overlayfs"}
		if r%2 == 1 {
			order = []string{"overlayfs", "dupsnap"}
		}
		for _, sn := range order {
			exec.Command("sync").Run() // the other snapshotter's dirty data is not this one's cost
			el := pullAll(sn)
			if sn == "dupsnap" {
				tDup = append(tDup, el)
				waitTrash(t, d.Root)
				duDup = duBytes(t, d.Root)
			} else {
				tOvl = append(tOvl, el)
				duOvl = duBytes(t, filepath.Join(ovlDir, "snapshots"))
			}
			t.Logf("rep %d %s: %v", r+1, sn, el.Round(time.Millisecond))
			removeAll()
		}
	}
	logCommitPhases(t, d.LogFile)
	if keep := os.Getenv("DUPSNAP_MEASURE_KEEP"); keep != "" {
		// Logs for a closer look (the test dir goes at cleanup).
		for _, f := range []string{d.LogFile, c.LogFile} {
			if b, err := os.ReadFile(f); err == nil {
				os.WriteFile(filepath.Join(keep, filepath.Base(f)), b, 0o644)
			}
		}
	}
	md, mo := median(tDup), median(tOvl)
	t.Logf("MEASURE pull+unpack of %d images (max_concurrent_unpacks %d, %d reps): dupsnap %v %v vs overlayfs %v %v: %.2fx (goal <= 1.1x)",
		len(refs), map[bool]int{true: unpacks, false: harness.DefaultConcurrentUnpacks}[unpacks > 0], reps, md.Round(time.Millisecond), tDup, mo.Round(time.Millisecond), tOvl, float64(md)/float64(mo))
	t.Logf("MEASURE node disk after pulling them: dupsnap root %d KiB vs overlayfs snapshots %d KiB: %.2fx (goal <= 0.6x)",
		duDup>>10, duOvl>>10, float64(duDup)/float64(max(duOvl, 1)))
}

// measureImages: img0 = base + data; img1 = base + the same data files at
// other paths (file-level dedup); img2 = img0's layers + a small layer
// (layer-level dedup).
func measureImages(t *testing.T) []v1.Image {
	t.Helper()
	base, err := harness.BaseFiles()
	if err != nil {
		t.Fatal(err)
	}
	mb := int64(48)
	if n, err := strconv.ParseInt(os.Getenv("DUPSNAP_MEASURE_MB"), 10, 64); err == nil && n > 0 {
		mb = n
	}
	data, err := harness.HostFiles([]string{"/usr/lib/x86_64-linux-gnu", "/usr/share", "/usr/bin"}, 4000, 4<<20, mb<<20)
	if err != nil {
		t.Fatal(err)
	}
	layer := func(files []harness.File) v1.Layer {
		l, err := harness.Layer(files)
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	bl, dl := layer(base), layer(data)
	img := func(ls ...v1.Layer) v1.Image {
		i, err := harness.Image([]string{"/bin/sh"}, ls...)
		if err != nil {
			t.Fatal(err)
		}
		return i
	}
	extra := layer([]harness.File{{Path: "etc/extra", Data: []byte("extra\n")}})
	return []v1.Image{img(bl, dl), img(bl, layer(harness.Relocate(data, "opt/copy"))), img(bl, dl, extra)}
}

// waitTrash waits (bounded) until dupsnap has deleted, in the background,
// the staging dirs of committed unpacks: disk is measured settled.
func waitTrash(t *testing.T, root string) {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if des, err := os.ReadDir(filepath.Join(root, "trash")); err != nil || len(des) == 0 {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Log("trash not empty after 30s")
}

func duBytes(t *testing.T, dir string) int64 {
	out, err := exec.Command("du", "-s", "--block-size=1", dir).Output()
	if err != nil {
		t.Logf("du %s: %v", dir, err)
		return 0
	}
	n, _ := strconv.ParseInt(strings.Fields(string(out))[0], 10, 64)
	return n
}

func median(ds []time.Duration) time.Duration {
	s := append([]time.Duration{}, ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	if len(s) == 0 {
		return 0
	}
	return s[len(s)/2]
}

// logCommitPhases prints the debug lines Prepare/Commit log with per-phase
// durations (last few), to see where the time goes.
func logCommitPhases(t *testing.T, logFile string) {
	b, err := os.ReadFile(logFile)
	if err != nil {
		return
	}
	var lines []string
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, "phases") {
			lines = append(lines, l)
		}
	}
	if len(lines) > 8 {
		lines = lines[len(lines)-8:]
	}
	for _, l := range lines {
		t.Log(l)
	}
}
