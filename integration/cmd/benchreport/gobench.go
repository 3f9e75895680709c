package main

import (
	"bufio"
	"context"
	"fmt"

	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/dupsnap/dupsnap/integration/harness"
)

// A pair of `go test -bench` benchmarks of one package: Name against its
// baseline Base, compared on ns/op (lower is better).
type goBenchPair struct {
	issue      int
	name, base string
	row        string
	goal       func(*Result)
}

// pkg/cow's own benchmarks (issue 4): region CoW against the plain-file
// (overlayfs-like) variant on the same filesystem.
var cowPairs = []goBenchPair{
	{4, "Overwrite4KCoW", "Overwrite4KCopyUp", "pkg/cow: 4 KiB overwrite of a 256 MiB file, durable (CoW vs copy-up)", ratioGoal("<=", 0.02)},
	{4, "Random4KCoW", "Random4KPlain", "pkg/cow: random 4 KiB writes (region vs plain file)", ratioGoal("<=", 1.0)},
	{4, "SeqWriteNewRegion", "SeqWriteNewPlain", "pkg/cow: sequential write of a new file (region vs plain)", ratioGoal("<=", 1.25)},
	{4, "SeqReadNewRegion", "SeqReadNewPlain", "pkg/cow: sequential read of a new file (region vs plain)", ratioGoal("<=", 1.25)},
}

// benchGoPkg runs the pairs' benchmarks of pkg (count = reps, a few
// iterations each) and adds one sample per count to each pair's row.
func benchGoPkg(ctx context.Context, rs *Results, pkg string, pairs []goBenchPair, reps int, scratch string, logf func(string, ...any)) error {
	var names []string
	for _, p := range pairs {
		names = append(names, p.name, p.base)
	}
	re := "^Benchmark(" + strings.Join(names, "|") + ")$"
	env := []string{"TMPDIR=" + scratch, "GOFLAGS=-count=1"}
	out, err := harness.Run(ctx, 8*time.Minute, env, "go", "test", "-run", "^$", "-bench", re, "-benchtime", "3x",
		"-count", strconv.Itoa(reps), "./"+filepath.Clean(pkg))
	if err != nil {
		return fmt.Errorf("go test -bench %s: %s", pkg, firstLine(err.Error()))
	}
	samples := map[string][]float64{}
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 4 || !strings.HasPrefix(f[0], "Benchmark") {
			continue
		}
		name := strings.TrimPrefix(f[0], "Benchmark")
		if i := strings.LastIndexByte(name, '-'); i > 0 {
			name = name[:i]
		}
		for i := 2; i+1 < len(f); i += 2 {
			if f[i+1] == "ns/op" {
				if v, err := strconv.ParseFloat(f[i], 64); err == nil {
					samples[name] = append(samples[name], v)
				}
			}
		}
	}
	for _, p := range pairs {
		a, b := samples[p.name], samples[p.base]
		if len(a) == 0 || len(b) == 0 {
			rs.NA(p.issue, p.row, "ms/op", p.base, p.goal, "benchmark did not run (renamed or failed)")
			continue
		}
		for i := 0; i < min(len(a), len(b)); i++ {
			rs.Add(p.issue, p.row, "ms/op", p.base, p.goal, a[i]/1e6, b[i]/1e6)
		}
		logf("  %s: %.3g ms/op vs %s %.3g ms/op", p.name, median(a)/1e6, p.base, median(b)/1e6)
	}
	return nil
}
