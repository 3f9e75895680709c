package cow

import (
	"bytes"
	"fmt"
	"slices"
	"testing"
)

// checkInvariants verifies that file maps, free runs, pending frees and
// placement windows partition the data file exactly, and that the counters
// match.
func checkInvariants(t testing.TB, r *Region) {
	t.Helper()
	r.syncMu.Lock()
	defer r.syncMu.Unlock()
	r.mu.Lock()
	defer r.mu.Unlock()
	type own struct {
		p, n uint64
		who  string
	}
	var all []own
	var used, resv, pend uint64
	for id, f := range r.files {
		for _, e := range f.m.e {
			all = append(all, own{e.P, e.N, fmt.Sprintf("file %d", id)})
			used += e.N
		}
		if f.resv.N > 0 {
			all = append(all, own{f.resv.P, f.resv.N, fmt.Sprintf("resv %d", id)})
			resv += f.resv.N
		}
		for i := 1; i < len(f.m.e); i++ {
			if f.m.e[i-1].L+f.m.e[i-1].N > f.m.e[i].L {
				t.Fatalf("file %d: overlapping logical extents %v", id, f.m.e)
			}
		}
	}
	for _, p := range r.pendFree {
		all = append(all, own{p.P, p.N, "pending"})
		pend += p.N
	}
	var free uint64
	for _, fr := range r.free.r {
		all = append(all, own{fr.P, fr.N, "free"})
		free += fr.N
	}
	slices.SortFunc(all, func(a, b own) int { return int(int64(a.p) - int64(b.p)) })
	next := uint64(0)
	for _, o := range all {
		if o.p != next {
			t.Fatalf("physical blocks: gap or overlap at %d (next owner %s at %d)", next, o.who, o.p)
		}
		next = o.p + o.n
	}
	if next != r.capBlk {
		t.Fatalf("owned blocks end at %d, capacity %d", next, r.capBlk)
	}
	if used != r.used || resv != r.resv || pend != r.pendBlk || free != r.free.total {
		t.Fatalf("counters: used %d/%d resv %d/%d pending %d/%d free %d/%d", used, r.used, resv, r.resv, pend, r.pendBlk, free, r.free.total)
	}
}

// readAll reads a whole File.
func readAll(t testing.TB, f *File, base []byte) []byte {
	t.Helper()
	buf := make([]byte, f.Size())
	n, err := f.ReadAt(buf, 0, bytes.NewReader(base))
	if n != len(buf) || (err != nil && len(buf) > 0) {
		t.Fatalf("read file %d: n=%d/%d err=%v", f.ID(), n, len(buf), err)
	}
	return buf
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

func errorf(format string, a ...any) error { return fmt.Errorf(format, a...) }
