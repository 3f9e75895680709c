package rootfs

import (
	"context"
	"os"
	"sort"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/dupsnap/dupsnap/pkg/layout"
)

// dirHandle is an open directory: a snapshot of its merged listing taken
// at opendir, so seeks and interrupted reads see stable offsets.
type dirHandle struct {
	ents []fuse.DirEntry
	pos  int
	up   string // upper dir path, for fsyncdir ("" if none)
	r    *rootFS
}

var (
	_ = (fs.FileReaddirenter)((*dirHandle)(nil))
	_ = (fs.FileSeekdirer)((*dirHandle)(nil))
	_ = (fs.FileFsyncdirer)((*dirHandle)(nil))
	_ = (fs.FileReleasedirer)((*dirHandle)(nil))
)

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
	ents, errno := n.r.list(&es, p)
	if errno != 0 {
		return nil, 0, errno
	}
	self := fuse.DirEntry{Name: ".", Mode: syscall.S_IFDIR, Ino: n.StableAttr().Ino}
	parent := fuse.DirEntry{Name: "..", Mode: syscall.S_IFDIR, Ino: 1}
	if _, p := n.Parent(); p != nil {
		parent.Ino = p.StableAttr().Ino
	}
	all := make([]fuse.DirEntry, 0, len(ents)+2)
	all = append(all, self, parent)
	all = append(all, ents...)
	for i := range all {
		all[i].Off = uint64(i + 1)
	}
	h := &dirHandle{ents: all, r: n.r}
	var fl uint32
	if es.up {
		h.up = n.r.upperPath(p)
	} else {
		// Pure image directory: its listing never changes behind the
		// kernel's back (a change through this mount bumps the dir's
		// version and drops the cache), so let the kernel keep it.
		fl = fuse.FOPEN_CACHE_DIR | fuse.FOPEN_KEEP_CACHE
	}
	return h, fl, 0
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
	if h.pos >= len(h.ents) {
		return nil, 0
	}
	e := h.ents[h.pos]
	h.pos++
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
