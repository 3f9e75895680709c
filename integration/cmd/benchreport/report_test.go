package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dupsnap/dupsnap/integration/harness/stack"
)

// The report: medians, ratios, goal status, n/a rows and the plots.
func TestReport(t *testing.T) {
	rs := &Results{}
	for _, v := range []float64{3, 1, 2} {
		rs.Add(3, "pull", "s", "overlayfs", ratioGoal("<=", 1.1), v, 2)
	}
	rs.Add(5, "restore", "MB/s", "", absGoal(">=", 300, "MB/s"), 100, -1)
	rs.NA(6, "wire", "MiB", "blobs", ratioGoal("<=", 0.7), "dupsnap not running")
	res := rs.Finish()
	if res[0].Value != 2 || res[0].Ratio != 1 || res[0].Status != "met" {
		t.Errorf("pull row: %+v", res[0])
	}
	if res[1].Status != "missed" || !strings.HasPrefix(res[2].Status, "n/a: dupsnap") {
		t.Errorf("rows: %+v %+v", res[1], res[2])
	}
	steps := func(d ...int64) []stack.PullStep {
		var out []stack.PullStep
		for _, x := range d {
			out = append(out, stack.PullStep{SnapDisk: x << 20, Time: time.Duration(x) * time.Millisecond})
		}
		return out
	}
	dir := t.TempDir()
	err := writeReport(dir, Report{Machine: machine(dir), Results: res,
		Pulls: map[string][]stack.PullStep{"overlayfs (offload)": steps(50, 100, 150), "dupsnap (offload)": steps(30, 40, 45)}})
	if err != nil {
		t.Fatal(err)
	}
	md, err := os.ReadFile(filepath.Join(dir, "REPORT.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"| pull | 2 s | 2 s (overlayfs) | 1x | <= 1.1x | met | 3 |", "**missed**", "n/a: dupsnap not running", "disk.png", "pull.png"} {
		if !strings.Contains(string(md), want) {
			t.Errorf("REPORT.md lacks %q:\n%s", want, md)
		}
	}
	for _, f := range []string{"disk.png", "pull.png", "results.json"} {
		if st, err := os.Stat(filepath.Join(dir, f)); err != nil || st.Size() == 0 {
			t.Errorf("%s: %v", f, err)
		}
	}
}
