package rootfs

import (
	"context"
	"sync"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
)

// Generations of upper inode numbers. Upper files are known to go-fuse by
// their upper dir st_ino, which the filesystem hands to a new file as soon
// as the old one is freed. go-fuse returns the existing Inode for a known
// StableAttr, so without a generation a new file would be attached to the
// node of the file that just went: a reader whose kernel dentry still
// names that node (write tmp; mv tmp counter, in a loop) would open the
// new, still empty file. A new generation gives the new file a node (and
// kernel node ID) of its own; the old node keeps no name and answers
// ESTALE, which makes the kernel look the name up again.
//
// Generations are kept only while go-fuse may hold a node for the number,
// so the map stays as small as the kernel's inode cache.
type inoGens struct {
	mu   sync.Mutex
	gen  map[uint64]uint64 // current generation (absent: 0)
	live map[uint64]int32  // nodes of any generation not yet forgotten
}

func (g *inoGens) current(ino uint64) uint64 {
	if ino < upperInoBase {
		return 0 // image inodes are never reused
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.gen[ino]
}

// fresh is the generation for a file just created with ino.
func (g *inoGens) fresh(ino uint64) uint64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.live[ino] > 0 {
		g.gen[ino]++
	} else {
		delete(g.gen, ino)
	}
	return g.gen[ino]
}

// made counts ch if it is the node just built (not one go-fuse already had).
func (g *inoGens) made(ch *fs.Inode, nn *node) {
	ino := ch.StableAttr().Ino
	if ino < upperInoBase || ch.Operations() != fs.InodeEmbedder(nn) {
		return
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	g.live[ino]++
}

func (g *inoGens) forgot(ino uint64) {
	if ino < upperInoBase {
		return
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.live[ino]--; g.live[ino] <= 0 {
		delete(g.live, ino)
		delete(g.gen, ino)
	}
}

// newUpperInode makes the node of an upper file that was just created with
// upper st_ino stIno: always a new node, never one of a previous file
// that had the same number.
func (r *rootFS) newUpperInode(ctx context.Context, parent *fs.Inode, mode uint32, stIno uint64) *fs.Inode {
	ino := upperInoBase + stIno
	nn := &node{r: r}
	ch := parent.NewInode(ctx, nn, fs.StableAttr{Mode: mode & syscall.S_IFMT, Ino: ino, Gen: r.gens.fresh(ino)})
	r.gens.made(ch, nn)
	return ch
}
