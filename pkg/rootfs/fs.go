package rootfs

import (
	"errors"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/dupsnap/dupsnap/pkg/cas"
	"github.com/dupsnap/dupsnap/pkg/layout"
)

// upperInoBase separates inode numbers of files that exist only in the
// upper dir (upperInoBase + st_ino) from image inodes (layout's 1..N).
const upperInoBase = 1 << 48

// cacheTimeout is used for entries, attributes and negative lookups. Every
// change to the tree goes through this mount (the kernel updates or drops
// what it cached), and image content never changes, so long is correct.
const cacheTimeout = time.Hour

// rootFS is the state shared by all nodes of one mount.
type rootFS struct {
	tree     *layout.Tree
	cas      *cas.Store
	upper    string // "" for views
	work     string
	readOnly bool
	data     writeLayer
	statfs   string // path whose filesystem statfs reports

	// mu orders namespace changes (create, rename, copy-up, ...) against
	// each other and against lookups that read the upper dir.
	mu sync.RWMutex
	// copyup maps the upper st_ino of a copied-up image inode to the inode
	// number the kernel already knows it by, so it keeps its identity.
	copyup map[uint64]uint64
	gens   inoGens // generations of reused upper inode numbers (gen.go)
	// links lists every image path of multiply linked image inodes: copy-up
	// links the copy to all its still visible names.
	links map[*layout.Node][]string

	tmpSeq   uint64
	dirNames sync.Map // *layout.Node -> []string, sorted child names
	dirEnts  sync.Map // *layout.Node -> []fuse.DirEntry (lowerEntries)
	dirNlink sync.Map // *layout.Node -> uint32 (lowerNlink of image dirs)

	cowState      // region of an active snapshot (region nil for views)
	backings      // passthrough backing files kept across opens
	plainNew bool // Config.PlainNewFiles
	// ptMin: clean image files at least this large are passthrough
	// (Config.PassthroughMinSize).
	ptMin int64
	// refresh re-reads attributes the kernel dropped (refresh.go).
	refresh *attrRefresher
}

func newRootFS(tree *layout.Tree, c *cas.Store, cfg Config, links map[*layout.Node][]string) *rootFS {
	if links == nil {
		links = linkIndex(tree)
	}
	r := &rootFS{
		tree:     tree,
		cas:      c,
		upper:    cfg.upperDir(),
		work:     cfg.workDir(),
		readOnly: cfg.ReadOnly,
		copyup:   map[uint64]uint64{},
		links:    links,
		gens:     inoGens{gen: map[uint64]uint64{}, live: map[uint64]int32{}},
		statfs:   cfg.CASRoot,
		ptMin:    cfg.ptMin(),
		refresh:  newAttrRefresher(cfg.Mountpoint, cfg.ReadOnly),
	}
	if cfg.StateDir != "" {
		r.statfs = cfg.StateDir
	}
	r.data = overlayData{cas: c}
	if cfg.StateDir != "" && !cfg.ReadOnly {
		r.data = cowData{r: r}
		r.open = map[uint64]*cowInode{}
		r.fresh = map[uint64]struct{}{}
		r.plainNew = cfg.PlainNewFiles
		if cfg.ReflinkCopyUp {
			enableReflinkCopyUp(true)
		}
	}
	return r
}

// linkIndex lists the names of tree's hardlinked image inodes (rootFS.links):
// a walk of the whole tree, which a spare server does ahead for the chain it
// preloads, off the container's start.
func linkIndex(tree *layout.Tree) map[*layout.Node][]string {
	links := map[*layout.Node][]string{}
	indexLinks(links, tree.Root, "")
	for _, names := range links {
		sort.Strings(names) // map order otherwise: the same tree, the same index
	}
	return links
}

func indexLinks(links map[*layout.Node][]string, n *layout.Node, p string) {
	for name, c := range n.Children {
		cp := name
		if p != "" {
			cp = p + "/" + name
		}
		if c.Entry.Type == layout.TypeDir {
			indexLinks(links, c, cp)
		} else if c.Nlink > 1 {
			links[c] = append(links[c], cp)
		}
	}
}

// sortedNames returns the child names of an image directory, cached.
func (r *rootFS) sortedNames(n *layout.Node) []string {
	if v, ok := r.dirNames.Load(n); ok {
		return v.([]string)
	}
	names := make([]string, 0, len(n.Children))
	for name := range n.Children {
		names = append(names, name)
	}
	sort.Strings(names)
	r.dirNames.Store(n, names)
	return names
}

func (r *rootFS) upperPath(p string) string {
	if p == "" {
		return r.upper
	}
	return filepath.Join(r.upper, p)
}

// entryState is what one name of the merged tree currently is.
type entryState struct {
	up     bool           // an upper entry (not a whiteout) exists
	st     syscall.Stat_t // its lstat when up
	opaque bool           // upper dir hides the lower dir below it
	wh     bool           // a whiteout hides the lower entry
	lower  *layout.Node   // the visible image entry (nil if none or hidden)
}

func (e *entryState) exists() bool { return e.up || e.lower != nil }

func (e *entryState) isDir() bool {
	if e.up {
		return e.st.Mode&syscall.S_IFMT == syscall.S_IFDIR
	}
	return e.lower != nil && e.lower.Entry.Type == layout.TypeDir
}

func isWhiteout(st *syscall.Stat_t) bool {
	return st.Mode&syscall.S_IFMT == syscall.S_IFCHR && st.Rdev == 0
}

// opaqueXattr marks an upper dir opaque (the format layout.FromDir reads).
const opaqueXattr = "trusted.overlay.opaque"

func isOpaque(p string) bool {
	var b [4]byte
	n, err := unix.Lgetxattr(p, opaqueXattr, b[:])
	return err == nil && n == 1 && b[0] == 'y'
}

// stateAt resolves path p given the lower node the caller expects there
// (lower is an upper bound: whatever the upper dir says wins).
func (r *rootFS) stateAt(p string, lower *layout.Node) (entryState, syscall.Errno) {
	es := entryState{lower: lower}
	if r.upper == "" {
		return es, 0
	}
	if err := syscall.Lstat(r.upperPath(p), &es.st); err == nil {
		if isWhiteout(&es.st) {
			es.wh, es.lower = true, nil
			return es, 0
		}
		es.up = true
		if es.st.Mode&syscall.S_IFMT == syscall.S_IFDIR && lower != nil && lower.Entry.Type == layout.TypeDir {
			// Opaque matters only over an image dir (one getxattr saved
			// per lookup of a container's own dirs).
			if es.opaque = isOpaque(r.upperPath(p)); es.opaque {
				es.lower = nil
			}
		} else {
			es.lower = nil
		}
	} else if err != syscall.ENOENT && err != syscall.ENOTDIR {
		return es, toErrno(err)
	}
	return es, 0
}

// child resolves name in directory state d (at path dp).
func (r *rootFS) child(d *entryState, dp, name string) (entryState, syscall.Errno) {
	var lower *layout.Node
	if d.lower != nil {
		lower = d.lower.Children[name]
	}
	if !d.up {
		// No upper dir: nothing below it can be in upper either.
		return entryState{lower: lower}, 0
	}
	return r.stateAt(join(dp, name), lower)
}

// lowerBelow reports whether an image entry named name exists below the
// merged dir d (visible or whited out): removing or replacing that name
// needs a whiteout or an opaque dir.
func lowerBelow(d *entryState, dirLower *layout.Node, name string) bool {
	if d.opaque || dirLower == nil {
		return false
	}
	return dirLower.Children[name] != nil
}

// resolve walks the merged tree from the root (used for the other names of
// hardlinked image inodes, whose nodes the kernel may never have looked up).
func (r *rootFS) resolve(p string) (entryState, syscall.Errno) {
	d, errno := r.stateAt("", r.tree.Root)
	if errno != 0 {
		return d, errno
	}
	cur := ""
	for _, name := range strings.Split(p, "/") {
		if !d.isDir() {
			return entryState{}, syscall.ENOTDIR
		}
		c, errno := r.child(&d, cur, name)
		if errno != 0 {
			return c, errno
		}
		if !c.exists() {
			return c, syscall.ENOENT
		}
		d, cur = c, join(cur, name)
	}
	return d, 0
}

// inoFor is the inode number of an upper entry.
func (r *rootFS) inoFor(st *syscall.Stat_t, lower *layout.Node) uint64 {
	if ino, ok := r.copyup[st.Ino]; ok {
		return ino
	}
	if lower != nil && st.Mode&syscall.S_IFMT == syscall.S_IFDIR {
		return lower.Ino // merged dir: same identity as before its copy-up
	}
	return upperInoBase + st.Ino
}

// lowerNlink counts the names of an image inode still visible.
func (r *rootFS) lowerNlink(ln *layout.Node) uint32 {
	if ln.Entry.Type == layout.TypeDir {
		// Counted once: image dirs never change, and a GETATTR of every
		// directory follows its first listing (the kernel drops a
		// directory's atime after each uncached READDIR).
		if v, ok := r.dirNlink.Load(ln); ok {
			return v.(uint32)
		}
		n := uint32(2)
		for _, c := range ln.Children {
			if c.Entry.Type == layout.TypeDir {
				n++
			}
		}
		r.dirNlink.Store(ln, n)
		return n
	}
	if ln.Nlink <= 1 {
		return 1
	}
	if r.upper == "" {
		return uint32(ln.Nlink)
	}
	n := uint32(0)
	for _, p := range r.links[ln] {
		if es, errno := r.resolve(p); errno == 0 && !es.up && es.lower == ln {
			n++
		}
	}
	if n == 0 {
		n = 1
	}
	return n
}

func typeBits(t layout.EntryType) uint32 {
	switch t {
	case layout.TypeDir:
		return syscall.S_IFDIR
	case layout.TypeSymlink:
		return syscall.S_IFLNK
	case layout.TypeChar:
		return syscall.S_IFCHR
	case layout.TypeBlock:
		return syscall.S_IFBLK
	case layout.TypeFifo:
		return syscall.S_IFIFO
	}
	return syscall.S_IFREG
}

// lowerAttr fills a from an image entry.
func (r *rootFS) lowerAttr(ln *layout.Node, a *fuse.Attr) {
	e := &ln.Entry
	a.Ino = ln.Ino
	a.Mode = typeBits(e.Type) | e.Mode&07777
	switch e.Type {
	case layout.TypeFile:
		a.Size = uint64(e.Size)
	case layout.TypeSymlink:
		a.Size = uint64(len(e.Linkname))
		a.Mode = syscall.S_IFLNK | 0o777 // Linux symlinks are always 0777
	case layout.TypeDir:
		a.Size = 4096
	}
	a.Blocks = (a.Size + 511) / 512
	a.Blksize = 4096
	a.Nlink = r.lowerNlink(ln)
	a.Owner = fuse.Owner{Uid: uint32(e.UID), Gid: uint32(e.GID)}
	if !e.ModTime.IsZero() {
		t := e.ModTime
		a.SetTimes(&t, &t, &t)
	}
	a.Rdev = uint32(unix.Mkdev(e.Devmajor, e.Devminor))
}

// upperAttr fills a from the lstat of an upper entry.
func upperAttr(st *syscall.Stat_t, ino uint64, a *fuse.Attr) {
	a.FromStat(st)
	a.Ino = ino
}

func join(dir, name string) string {
	if dir == "" {
		return name
	}
	return dir + "/" + name
}

func toErrno(err error) syscall.Errno {
	if err == nil {
		return 0
	}
	var e syscall.Errno
	if errors.As(err, &e) {
		return e
	}
	return fsErrno(err)
}

// cowSize is the size of the upper file at up (lstat st) if its data is in
// the region: from the open state, else from the region's table.
func (r *rootFS) cowSize(up string, st *syscall.Stat_t) (int64, bool) {
	ref, ok := readCowRef(up)
	if !ok {
		return 0, false
	}
	if ci := r.liveCow(ref.id); ci != nil {
		ci.touch()
		syscall.Lstat(up, st) // touch changed mtime
		return ci.f.Size(), true
	}
	if f, err := r.region.File(ref.id); err == nil {
		return f.Size(), true
	}
	return ref.baseSize, true // not created yet: the base as is
}
