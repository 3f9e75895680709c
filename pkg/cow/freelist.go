package cow

import (
	"fmt"
	"slices"
	"sort"
)

// run is a range of physical blocks.
type run struct{ P, N uint64 }

// freeList holds the free physical runs of the data file, sorted and
// coalesced.
type freeList struct {
	r     []run
	total uint64
}

func (f *freeList) search(p uint64) int {
	return sort.Search(len(f.r), func(i int) bool { return f.r[i].P+f.r[i].N > p })
}

// add frees [p, p+n); overlapping an already free block is a bug in the
// caller and is reported, since it would mean two owners of one block.
func (f *freeList) add(p, n uint64) error {
	if n == 0 {
		return nil
	}
	i := f.search(p)
	if i < len(f.r) && f.r[i].P < p+n {
		return fmt.Errorf("cow: double free of blocks [%d,%d) overlapping free run [%d,%d)", p, p+n, f.r[i].P, f.r[i].P+f.r[i].N)
	}
	f.total += n
	if i > 0 && f.r[i-1].P+f.r[i-1].N == p {
		f.r[i-1].N += n
		if i < len(f.r) && f.r[i].P == p+n {
			f.r[i-1].N += f.r[i].N
			f.r = slices.Delete(f.r, i, i+1)
		}
		return nil
	}
	if i < len(f.r) && f.r[i].P == p+n {
		f.r[i].P, f.r[i].N = p, f.r[i].N+n
		return nil
	}
	f.r = slices.Insert(f.r, i, run{p, n})
	return nil
}

// takeAt allocates up to want blocks starting exactly at p, if p is free.
func (f *freeList) takeAt(p, want uint64) uint64 {
	i := f.search(p)
	if i >= len(f.r) || f.r[i].P > p || want == 0 {
		return 0
	}
	r := f.r[i]
	n := min(want, r.P+r.N-p)
	f.cut(i, p, n)
	return n
}

// cut removes [p, p+n) from run i, which contains it.
func (f *freeList) cut(i int, p, n uint64) {
	r := f.r[i]
	f.total -= n
	var keep []run
	if r.P < p {
		keep = append(keep, run{r.P, p - r.P})
	}
	if p+n < r.P+r.N {
		keep = append(keep, run{p + n, r.P + r.N - (p + n)})
	}
	f.r = slices.Replace(f.r, i, i+1, keep...)
}

// find picks a run for a new placement: next-fit from goal, first a run of
// at least ideal blocks, then one of at least want, then anything.
// It returns the index of the run or -1.
func (f *freeList) find(goal, want, ideal uint64) int {
	if len(f.r) == 0 {
		return -1
	}
	start := f.search(goal)
	for _, need := range []uint64{ideal, want} {
		for k := range len(f.r) {
			i := (start + k) % len(f.r)
			if f.r[i].N >= need {
				return i
			}
		}
	}
	// No run is big enough: take the largest to limit fragmentation.
	best := 0
	for i, r := range f.r {
		if r.N > f.r[best].N {
			best = i
		}
	}
	return best
}
