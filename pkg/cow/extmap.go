package cow

import (
	"math"
	"slices"
	"sort"
)

// extent maps Count logical blocks starting at Logical to physical blocks
// starting at Phys (block units).
type extent struct{ L, P, N uint64 }

// extMap is a file's block map: extents sorted by L, non-overlapping.
// A sorted slice keeps the common cases (sequential files, a few CoW runs
// in an image file) compact and cache friendly.
type extMap struct{ e []extent }

// search returns the index of the first extent ending after l.
func (m *extMap) search(l uint64) int {
	return sort.Search(len(m.e), func(i int) bool { return m.e[i].L+m.e[i].N > l })
}

// lookup reports where logical block l lives: mapped at p with n blocks
// contiguous from there, or a hole of n blocks (MaxUint64-l past the end).
func (m *extMap) lookup(l uint64) (p, n uint64, ok bool) {
	i := m.search(l)
	if i < len(m.e) && m.e[i].L <= l {
		e := m.e[i]
		return e.P + (l - e.L), e.L + e.N - l, true
	}
	if i < len(m.e) {
		return 0, m.e[i].L - l, false
	}
	return 0, math.MaxUint64 - l, false
}

// insert maps the unmapped range [l, l+n) to [p, p+n), merging with
// neighbours that are contiguous both logically and physically.
func (m *extMap) insert(l, p, n uint64) {
	i := m.search(l)
	if i > 0 {
		pr := &m.e[i-1]
		if pr.L+pr.N == l && pr.P+pr.N == p {
			pr.N += n
			if i < len(m.e) && m.e[i].L == l+n && m.e[i].P == p+n {
				pr.N += m.e[i].N
				m.e = slices.Delete(m.e, i, i+1)
			}
			return
		}
	}
	if i < len(m.e) && m.e[i].L == l+n && m.e[i].P == p+n {
		m.e[i].L, m.e[i].P, m.e[i].N = l, p, m.e[i].N+n
		return
	}
	m.e = slices.Insert(m.e, i, extent{l, p, n})
}

// remove unmaps [l, l+n) and calls freed for every physical run released.
func (m *extMap) remove(l, n uint64, freed func(p, n uint64)) {
	end := l + n
	if end < l { // overflow: to the end
		end = math.MaxUint64
	}
	i := m.search(l)
	j := i
	var keep []extent
	for ; j < len(m.e) && m.e[j].L < end; j++ {
		e := m.e[j]
		s, t := max(e.L, l), min(e.L+e.N, end)
		freed(e.P+(s-e.L), t-s)
		if e.L < s {
			keep = append(keep, extent{e.L, e.P, s - e.L})
		}
		if t < e.L+e.N {
			keep = append(keep, extent{t, e.P + (t - e.L), e.L + e.N - t})
		}
	}
	m.e = slices.Replace(m.e, i, j, keep...)
}

// blocks is the number of mapped blocks.
func (m *extMap) blocks() uint64 {
	var s uint64
	for _, e := range m.e {
		s += e.N
	}
	return s
}
