package main

import (
	"fmt"
	"math"
	"sort"
)

// Result is one row of the report: a measured value next to its baseline
// from the same run, the ratio and the issue's goal.
type Result struct {
	Issue    int       `json:"issue"`
	Name     string    `json:"name"`
	Unit     string    `json:"unit"`
	Value    float64   `json:"value"`    // median of Samples
	Baseline float64   `json:"baseline"` // median of BaseSamples (0: none)
	BaseName string    `json:"baseline_name,omitempty"`
	Ratio    float64   `json:"ratio"` // Value/Baseline (0: no baseline)
	Goal     string    `json:"goal"`  // e.g. "<= 1.1x" or ">= 300 MB/s"
	Status   string    `json:"status"`
	Samples  []float64 `json:"samples,omitempty"`
	BaseSamp []float64 `json:"baseline_samples,omitempty"`
	Note     string    `json:"note,omitempty"`
	// goal: ratio (or value, if absolute) compared with op to x.
	op       string
	x        float64
	absolute bool
}

// Goals: on the ratio value/baseline, or on the value itself.
func ratioGoal(op string, x float64) func(*Result) {
	return func(r *Result) { r.op, r.x, r.Goal = op, x, fmt.Sprintf("%s %gx", op, x) }
}
func absGoal(op string, x float64, unit string) func(*Result) {
	return func(r *Result) { r.op, r.x, r.absolute, r.Goal = op, x, true, fmt.Sprintf("%s %g %s", op, x, unit) }
}

// finish computes medians, the ratio and met/missed.
func (r *Result) finish() {
	r.Value = median(r.Samples)
	r.Baseline = median(r.BaseSamp)
	if r.Baseline != 0 {
		r.Ratio = r.Value / r.Baseline
	}
	if r.Status != "" { // n/a already
		return
	}
	if len(r.Samples) == 0 {
		r.Status = "n/a: no samples"
		return
	}
	v := r.Ratio
	if r.absolute {
		v = r.Value
	} else if r.Baseline == 0 {
		r.Status = "n/a: no baseline"
		return
	}
	switch {
	case r.op == "":
		r.Status = "info"
	case r.op == "<=" && v <= r.x, r.op == ">=" && v >= r.x:
		r.Status = "met"
	default:
		r.Status = "missed"
	}
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func percentile(xs []float64, p float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	i := int(math.Ceil(p*float64(len(s)))) - 1
	return s[max(0, min(i, len(s)-1))]
}

// Results collects rows by key, so that repetitions add samples to one row.
type Results struct {
	rows  []*Result
	byKey map[string]*Result
}

func (rs *Results) row(issue int, name, unit, baseName string, goal func(*Result)) *Result {
	if rs.byKey == nil {
		rs.byKey = map[string]*Result{}
	}
	k := fmt.Sprintf("%d/%s", issue, name)
	if r, ok := rs.byKey[k]; ok {
		return r
	}
	r := &Result{Issue: issue, Name: name, Unit: unit, BaseName: baseName}
	if goal != nil {
		goal(r)
	}
	rs.byKey[k] = r
	rs.rows = append(rs.rows, r)
	return r
}

// Add records one sample of value and baseline (baseline < 0: none).
func (rs *Results) Add(issue int, name, unit, baseName string, goal func(*Result), value, baseline float64) {
	r := rs.row(issue, name, unit, baseName, goal)
	r.Samples = append(r.Samples, value)
	if baseline >= 0 {
		r.BaseSamp = append(r.BaseSamp, baseline)
	}
}

// NA marks a row not measured, with the reason (kept if it has samples).
func (rs *Results) NA(issue int, name, unit, baseName string, goal func(*Result), reason string) {
	r := rs.row(issue, name, unit, baseName, goal)
	if len(r.Samples) == 0 {
		r.Status = "n/a: " + reason
	} else if r.Note == "" {
		r.Note = "some repetitions failed: " + reason
	}
}

// Note attaches a remark to a row.
func (rs *Results) Note(issue int, name, note string) {
	if r, ok := rs.byKey[fmt.Sprintf("%d/%s", issue, name)]; ok {
		r.Note = note
	}
}

func (rs *Results) Finish() []*Result {
	for _, r := range rs.rows {
		r.finish()
	}
	sort.SliceStable(rs.rows, func(i, j int) bool { return rs.rows[i].Issue < rs.rows[j].Issue })
	return rs.rows
}
