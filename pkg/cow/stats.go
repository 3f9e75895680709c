package cow

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// Stats describes a region's space and layout.
type Stats struct {
	BlockSize int64
	Capacity  int64 // data file size (preallocated + grown)
	MaxSize   int64 // the cap; 0 = unlimited
	Used      int64 // bytes mapped by files (the snapshot's usage)
	Free      int64 // allocatable now
	Reserved  int64 // held in per-file placement windows (reclaimable)
	Pending   int64 // freed, reusable after the next Sync
	DiskBytes int64 // bytes the data file occupies on the host fs
	Journal   int64 // journal size
	Files     int
	Extents   int
	// ExtentsPerFile is the average extent count over files that have any;
	// AvgExtentBytes the mean extent length (higher = less fragmented).
	ExtentsPerFile float64
	AvgExtentBytes float64
}

// Usage is the region's mapped bytes (O(1)).
func (r *Region) Usage() int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return int64(r.used * r.bs)
}

// Stats reports space and fragmentation. It walks the file table (O(files)).
func (r *Region) Stats() Stats {
	r.mu.Lock()
	bs := int64(r.bs)
	s := Stats{
		BlockSize: bs, Capacity: int64(r.capBlk) * bs, MaxSize: r.opts.MaxSize,
		Used: int64(r.used) * bs, Free: int64(r.free.total) * bs, Reserved: int64(r.resv) * bs,
		Pending: int64(r.pendBlk) * bs, Files: len(r.files),
	}
	files := make([]*File, 0, len(r.files))
	for _, f := range r.files {
		files = append(files, f)
	}
	if r.j != nil {
		s.Journal = r.j.size
	}
	r.mu.Unlock()
	withExt := 0
	var blocks uint64
	for _, f := range files {
		f.mu.RLock()
		if n := len(f.m.e); n > 0 {
			withExt++
			s.Extents += n
			blocks += f.m.blocks()
		}
		f.mu.RUnlock()
	}
	if withExt > 0 {
		s.ExtentsPerFile = float64(s.Extents) / float64(withExt)
		s.AvgExtentBytes = float64(blocks) * float64(bs) / float64(s.Extents)
	}
	var st unix.Stat_t
	if unix.Fstat(int(r.data.Fd()), &st) == nil {
		s.DiskBytes = st.Blocks * 512
	}
	return s
}

// Statfs is what the rootfs reports for statfs(2), in BlockSize units.
type Statfs struct {
	BlockSize uint32
	Blocks    uint64 // total
	Free      uint64 // = available (no root reserve inside a container)
}

// Statfs: with a cap, total is the cap and free is the cap minus used
// bytes. Without a cap the region can grow until the host filesystem is
// full, so total is the region's current capacity plus the host's
// available space, and free is that minus used: df inside the container
// then tells the truth about how much more can be written.
func (r *Region) Statfs() (Statfs, error) {
	r.mu.Lock()
	bs, used, capBlk, maxSize := r.bs, r.used+r.pendBlk, r.capBlk, r.opts.MaxSize
	r.mu.Unlock()
	var total uint64
	if maxSize > 0 {
		total = uint64(maxSize) / bs
	} else {
		var st unix.Statfs_t
		if err := unix.Statfs(r.dir, &st); err != nil {
			return Statfs{}, fmt.Errorf("cow: statfs %s: %w", r.dir, err)
		}
		total = capBlk + st.Bavail*uint64(st.Bsize)/bs
	}
	free := uint64(0)
	if total > used {
		free = total - used
	}
	return Statfs{BlockSize: uint32(bs), Blocks: total, Free: free}, nil
}
