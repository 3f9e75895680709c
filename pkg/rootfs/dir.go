package rootfs

import (
	"context"
	"os"
	"sort"
	"sync/atomic"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/dupsnap/dupsnap/pkg/layout"
)

// dirHandle is a directory being listed. The kernel never opens
// directories on the server (OPENDIR answers ENOSYS, see noOpendirFS):
// every READDIR gets a handle of its own, and offsets are positions in the
// merged listing. An image directory's listing never changes; an upper
// directory's is kept on its node from the READDIR at offset 0 to the
// ones that continue it, so a reader that removes entries while listing
// (rm -r) is not shown a shifted listing.
type dirHandle struct {
	dots [2]fuse.DirEntry // "." and ".."
	ents []fuse.DirEntry  // shared, read-only
	pos  int
	up   string // upper dir path, for fsyncdir ("" if none)
	r    *rootFS
	// snap is the node's kept listing (upper dirs): dropped once read to
	// the end, so no listing outlives its reader.
	snap *atomic.Pointer[[]fuse.DirEntry]
}

var (
	_ = (fs.FileReaddirenter)((*dirHandle)(nil))
	_ = (fs.FileSeekdirer)((*dirHandle)(nil))
	_ = (fs.FileFsyncdirer)((*dirHandle)(nil))
	_ = (fs.FileReleasedirer)((*dirHandle)(nil))
)

// dirResume is set in the open flags of a READDIR's handle that continues
// a listing (offset > 0): see noOpendirFS.
const dirResume = 1 << 30

func (n *node) OpendirHandle(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	n.r.mu.RLock()
	defer n.r.mu.RUnlock()
	es, p, errno := n.state()
	if errno != 0 {
		return nil, 0, errno
	}
	if !es.isDir() {
		return nil, 0, syscall.ENOTDIR
	}
	n.r.refresh.add(n) // this READDIR drops the directory's atime in the kernel
	h := &dirHandle{r: n.r}
	h.dots[0] = fuse.DirEntry{Name: ".", Mode: syscall.S_IFDIR, Ino: n.StableAttr().Ino}
	h.dots[1] = fuse.DirEntry{Name: "..", Mode: syscall.S_IFDIR, Ino: 1}
	if _, p := n.Parent(); p != nil {
		h.dots[1].Ino = p.StableAttr().Ino
	}
	if !es.up {
		h.ents = n.r.lowerEntries(es.lower)
		return h, fuse.FOPEN_CACHE_DIR | fuse.FOPEN_KEEP_CACHE, 0
	}
	h.up = n.r.upperPath(p)
	if s := n.dirSnap.Load(); s != nil && flags&dirResume != 0 {
		h.ents, h.snap = *s, &n.dirSnap
		return h, 0, 0
	}
	ents, errno := n.r.list(&es, p)
	if errno != 0 {
		return nil, 0, errno
	}
	h.ents = ents
	h.snap = &n.dirSnap
	n.dirSnap.Store(&ents)
	return h, 0, 0
}

// lowerEntries is the listing of an image directory, built once.
func (r *rootFS) lowerEntries(ln *layout.Node) []fuse.DirEntry {
	if v, ok := r.dirEnts.Load(ln); ok {
		return v.([]fuse.DirEntry)
	}
	es := entryState{lower: ln}
	ents, _ := r.list(&es, "")
	r.dirEnts.Store(ln, ents)
	return ents
}

// list returns the merged entries of directory es at path p.
// mustBeEmpty is ENOTEMPTY unless the merged directory at p lists nothing
// (rmdir, and rename onto a directory).
func (r *rootFS) mustBeEmpty(es *entryState, p string) syscall.Errno {
	ents, errno := r.list(es, p)
	if errno == 0 && len(ents) > 0 {
		return syscall.ENOTEMPTY
	}
	return errno
}

func (r *rootFS) list(es *entryState, p string) ([]fuse.DirEntry, syscall.Errno) {
	var out []fuse.DirEntry
	if !es.up {
		for _, name := range r.sortedNames(es.lower) {
			c := es.lower.Children[name]
			out = append(out, fuse.DirEntry{Name: name, Mode: typeBits(c.Entry.Type), Ino: c.Ino})
		}
		return out, 0
	}
	up := r.upperPath(p)
	f, err := os.Open(up)
	if err != nil {
		return nil, toErrno(err)
	}
	names, err := f.Readdirnames(-1)
	f.Close()
	if err != nil {
		return nil, toErrno(err)
	}
	sort.Strings(names)
	seen := make(map[string]bool, len(names))
	for _, name := range names {
		seen[name] = true
		var st syscall.Stat_t
		if err := syscall.Lstat(up+"/"+name, &st); err != nil {
			continue // raced with a change; the next listing will tell
		}
		if isWhiteout(&st) {
			continue
		}
		var lower *layout.Node
		if es.lower != nil {
			lower = es.lower.Children[name]
			if lower != nil && (st.Mode&syscall.S_IFMT != syscall.S_IFDIR || isOpaque(up+"/"+name)) {
				lower = nil
			}
		}
		out = append(out, fuse.DirEntry{Name: name, Mode: st.Mode & syscall.S_IFMT, Ino: r.inoFor(&st, lower)})
	}
	if es.lower != nil {
		for _, name := range r.sortedNames(es.lower) {
			if seen[name] {
				continue
			}
			c := es.lower.Children[name]
			out = append(out, fuse.DirEntry{Name: name, Mode: typeBits(c.Entry.Type), Ino: c.Ino})
		}
	}
	return out, 0
}

func (h *dirHandle) Readdirent(ctx context.Context) (*fuse.DirEntry, syscall.Errno) {
	var e fuse.DirEntry
	switch {
	case h.pos < len(h.dots):
		e = h.dots[h.pos]
	case h.pos-len(h.dots) < len(h.ents):
		e = h.ents[h.pos-len(h.dots)]
	default:
		if h.snap != nil {
			h.snap.Store(nil)
		}
		return nil, 0
	}
	h.pos++
	e.Off = uint64(h.pos)
	return &e, 0
}

func (h *dirHandle) Seekdir(ctx context.Context, off uint64) syscall.Errno {
	h.pos = int(off)
	return 0
}

// Fsyncdir also commits the region: syncfs(2) and Changes (fsync of the
// mount root) reach the server this way.
func (h *dirHandle) Fsyncdir(ctx context.Context, flags uint32) syscall.Errno {
	if h.r.region != nil {
		if err := h.r.region.Sync(); err != nil {
			return toErrno(err)
		}
	}
	if h.up == "" {
		return 0
	}
	f, err := os.Open(h.up)
	if err != nil {
		return toErrno(err)
	}
	defer f.Close()
	return toErrno(f.Sync())
}

func (h *dirHandle) Releasedir(ctx context.Context, flags uint32) {}
