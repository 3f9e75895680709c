package rootfs

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"
	"unsafe"

	"github.com/opencontainers/go-digest"

	"github.com/dupsnap/dupsnap/pkg/layout"
)

// Tree cache: every rootfs server of an image used to read, checksum,
// decompress and decode each layer manifest (tar header bytes included) and
// merge the chain, 10-40 ms per container start on a 2-core node. The merged
// tree of a chain never changes (manifests are immutable, keyed by diffID),
// so the first server of a chain writes it, after its mount is up, to a
// compact file keyed by the chain; later servers decode that instead: one
// read, a CRC and a flat decode into a single node slice.
//
// The cache is only an accelerator: a missing, stale-format or corrupt
// file is ignored (the manifests are merged as before), writes are atomic
// renames without fsync, and the directory is trimmed to treeCacheMax
// files by age. A file is named by treeKey of its layer list, which mixes
// in treeFormat: bump it whenever the encoding or layout.Merge's result
// changes, so that old files are simply never read again.

const (
	treeMagic  = "DSRT"
	treeFormat = 2
	// treeCacheMax and treeCacheMaxBytes bound the files kept (one per
	// image chain in use; ~200 bytes per entry).
	treeCacheMax      = 64
	treeCacheMaxBytes = 256 << 20
	// treeMaxNodes refuses absurd node counts before allocating.
	treeMaxNodes = 1 << 24
)

// treeCacheDir is where the trees of a node live: next to its manifest
// store (outside it: that dir belongs to pkg/layout).
func treeCacheDir(manifestRoot string) string {
	return filepath.Join(filepath.Dir(filepath.Clean(manifestRoot)), "rootfs-trees")
}

// treeKey names the merged tree of layers (bottom first).
func treeKey(layers []digest.Digest) string {
	h := sha256.New()
	fmt.Fprintf(h, "dupsnap rootfs tree v%d\n", treeFormat)
	for _, d := range layers {
		h.Write([]byte(d))
		h.Write([]byte{'\n'})
	}
	return hex.EncodeToString(h.Sum(nil))
}

func treeCachePath(manifestRoot string, layers []digest.Digest) string {
	return filepath.Join(treeCacheDir(manifestRoot), treeKey(layers))
}

var crcTable = crc32.MakeTable(crc32.Castagnoli)

type treeEnc struct{ b []byte }

func (e *treeEnc) uv(v uint64)  { e.b = binary.AppendUvarint(e.b, v) }
func (e *treeEnc) sv(v int64)   { e.b = binary.AppendVarint(e.b, v) }
func (e *treeEnc) str(s string) { e.uv(uint64(len(s))); e.b = append(e.b, s...) }

// time keeps what reflect.DeepEqual sees: the zero Time (dirs Merge made)
// stays zero, and the location (manifests decode to time.Local).
func (e *treeEnc) time(t time.Time) {
	switch {
	case t == time.Time{}:
		e.b = append(e.b, 0)
		return
	case t.Location() == time.UTC:
		e.b = append(e.b, 2)
	default:
		e.b = append(e.b, 1)
	}
	e.sv(t.Unix())
	e.uv(uint64(t.Nanosecond()))
}

// encodeTree serialises t: the nodes in depth-first order (hardlinked
// nodes once), each with its entry and, for directories, its children as
// (name, node index).
func encodeTree(t *layout.Tree, key string) ([]byte, error) {
	index := map[*layout.Node]int{}
	var order []*layout.Node
	var visit func(n *layout.Node)
	visit = func(n *layout.Node) {
		if _, ok := index[n]; ok {
			return
		}
		index[n] = len(order)
		order = append(order, n)
		for _, c := range n.Children {
			visit(c)
		}
	}
	visit(t.Root)
	e := &treeEnc{b: make([]byte, 0, 64+len(order)*160)}
	e.b = append(e.b, treeMagic...)
	e.b = append(e.b, treeFormat)
	e.str(key)
	e.uv(uint64(len(order)))
	names := []string{}
	for _, n := range order {
		en := &n.Entry
		e.uv(n.Ino)
		e.uv(uint64(n.Nlink))
		e.b = append(e.b, byte(en.Type))
		var flags byte
		if en.Whiteout {
			flags |= 1
		}
		if en.Opaque {
			flags |= 2
		}
		if n.Children != nil {
			flags |= 4
		}
		e.b = append(e.b, flags)
		e.str(en.Path)
		e.uv(uint64(en.Mode))
		e.sv(int64(en.UID))
		e.sv(int64(en.GID))
		e.time(en.ModTime)
		e.time(en.AccessTime)
		e.time(en.ChangeTime)
		e.str(en.Linkname)
		e.uv(uint64(en.Devmajor))
		e.uv(uint64(en.Devminor))
		e.sv(en.Size)
		e.str(string(en.Digest))
		names = names[:0]
		for k := range en.Xattrs {
			names = append(names, k)
		}
		sort.Strings(names)
		if en.Xattrs == nil {
			e.uv(0)
		} else {
			e.uv(uint64(len(names)) + 1) // 1: an empty, non-nil map
		}
		for _, k := range names {
			e.str(k)
			e.str(en.Xattrs[k])
		}
		if n.Children != nil {
			e.uv(uint64(len(n.Children)))
			for name, c := range n.Children {
				e.str(name)
				e.uv(uint64(index[c]))
			}
		}
	}
	e.b = binary.LittleEndian.AppendUint32(e.b, crc32.Checksum(e.b, crcTable))
	return e.b, nil
}

var errTreeCorrupt = errors.New("rootfs: corrupt tree cache")

// treeDec decodes out of one string: every string of the tree is a
// substring of it (no allocation per name, path or digest).
type treeDec struct {
	s   string
	err error
}

func (d *treeDec) fail() {
	if d.err == nil {
		d.err = errTreeCorrupt
	}
}

func (d *treeDec) uv() uint64 {
	if d.err != nil {
		return 0
	}
	var v uint64
	var shift uint
	for i := 0; i < len(d.s) && i < binary.MaxVarintLen64; i++ {
		b := d.s[i]
		if b < 0x80 {
			d.s = d.s[i+1:]
			return v | uint64(b)<<shift
		}
		v |= uint64(b&0x7f) << shift
		shift += 7
	}
	d.fail()
	return 0
}

func (d *treeDec) sv() int64 {
	u := d.uv()
	x := int64(u >> 1)
	if u&1 != 0 {
		x = ^x
	}
	return x
}

func (d *treeDec) byte() byte {
	if d.err != nil || len(d.s) == 0 {
		d.fail()
		return 0
	}
	b := d.s[0]
	d.s = d.s[1:]
	return b
}

func (d *treeDec) str() string {
	n := d.uv()
	if d.err != nil || n > uint64(len(d.s)) {
		d.fail()
		return ""
	}
	v := d.s[:n]
	d.s = d.s[n:]
	return v
}

func (d *treeDec) time() time.Time {
	kind := d.byte()
	if kind == 0 || kind > 2 {
		if kind > 2 {
			d.fail()
		}
		return time.Time{}
	}
	s := d.sv()
	ns := d.uv()
	if ns > 999999999 {
		d.fail()
		return time.Time{}
	}
	if kind == 2 {
		return time.Unix(s, int64(ns)).UTC()
	}
	return time.Unix(s, int64(ns))
}

// decodeTree is the inverse of encodeTree; key must match the file's.
func decodeTree(b []byte, key string) (*layout.Tree, error) {
	if len(b) < len(treeMagic)+1+4 || string(b[:4]) != treeMagic || b[4] != treeFormat {
		return nil, errTreeCorrupt
	}
	body := b[:len(b)-4]
	if crc32.Checksum(body, crcTable) != binary.LittleEndian.Uint32(b[len(b)-4:]) {
		return nil, errTreeCorrupt
	}
	// b is never written again: the tree's strings point into it.
	d := &treeDec{s: unsafe.String(&body[5], len(body)-5)}
	if d.str() != key {
		return nil, errTreeCorrupt
	}
	count := d.uv()
	if d.err != nil || count == 0 || count > treeMaxNodes || count > uint64(len(d.s)) {
		return nil, errTreeCorrupt
	}
	// One allocation for every node: they live as long as the tree.
	nodes := make([]layout.Node, count)
	seen := make([]bool, count)
	seen[0] = true
	var back []int
	for i := range nodes {
		n := &nodes[i]
		n.Ino = d.uv()
		n.Nlink = int(d.uv())
		en := &n.Entry
		en.Type = layout.EntryType(d.byte())
		flags := d.byte()
		en.Whiteout, en.Opaque = flags&1 != 0, flags&2 != 0
		en.Path = d.str()
		en.Mode = uint32(d.uv())
		en.UID = int(d.sv())
		en.GID = int(d.sv())
		en.ModTime = d.time()
		en.AccessTime = d.time()
		en.ChangeTime = d.time()
		en.Linkname = d.str()
		en.Devmajor = uint32(d.uv())
		en.Devminor = uint32(d.uv())
		en.Size = d.sv()
		en.Digest = digest.Digest(d.str())
		if nx := d.uv(); nx > 0 {
			if nx-1 > uint64(len(d.s)) {
				return nil, errTreeCorrupt
			}
			en.Xattrs = make(map[string]string, nx-1)
			for j := uint64(1); j < nx; j++ {
				k := d.str()
				en.Xattrs[k] = d.str()
			}
		}
		if flags&4 != 0 {
			nc := d.uv()
			if d.err != nil || nc > uint64(len(d.s)) {
				return nil, errTreeCorrupt
			}
			n.Children = make(map[string]*layout.Node, nc)
			for j := uint64(0); j < nc; j++ {
				name := d.str()
				ci := d.uv()
				if d.err != nil || ci == 0 || ci >= count || name == "" || strings.Contains(name, "/") {
					return nil, errTreeCorrupt
				}
				if ci <= uint64(i) {
					back = append(back, int(ci)) // a hardlink's second name
				}
				seen[ci] = true
				n.Children[name] = &nodes[ci]
			}
		}
		if d.err != nil {
			return nil, d.err
		}
	}
	if len(d.s) != 0 {
		return nil, errTreeCorrupt
	}
	for _, ok := range seen {
		if !ok {
			return nil, errTreeCorrupt
		}
	}
	// Directories come after their parent (depth-first): only files may be
	// named again from later, so no directory is its own ancestor.
	for _, ci := range back {
		if nodes[ci].Children != nil {
			return nil, errTreeCorrupt
		}
	}
	return &layout.Tree{Root: &nodes[0]}, nil
}

// loadTreeCache returns the cached tree of layers, or nil.
func loadTreeCache(manifestRoot string, layers []digest.Digest) *layout.Tree {
	key := treeKey(layers)
	b, err := os.ReadFile(filepath.Join(treeCacheDir(manifestRoot), key))
	if err != nil {
		return nil
	}
	t, err := decodeTree(b, key)
	if err != nil {
		return nil
	}
	return t
}

// touchTreeCache marks the tree of layers as used (trimming keeps the
// most recently used).
func touchTreeCache(manifestRoot string, layers []digest.Digest) {
	now := time.Now()
	os.Chtimes(treeCachePath(manifestRoot, layers), now, now)
}

// storeTreeCache writes t as the tree of layers (atomically; no fsync: a
// torn file fails its CRC and is rebuilt) and trims the cache dir.
func storeTreeCache(manifestRoot string, layers []digest.Digest, t *layout.Tree) error {
	key := treeKey(layers)
	b, err := encodeTree(t, key)
	if err != nil {
		return err
	}
	dir := treeCacheDir(manifestRoot)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("rootfs: tree cache: %w", err)
	}
	f, err := os.CreateTemp(dir, ".tmp-")
	if err != nil {
		return fmt.Errorf("rootfs: tree cache: %w", err)
	}
	_, werr := f.Write(b)
	cerr := f.Close()
	if werr == nil {
		werr = cerr
	}
	if werr == nil {
		werr = os.Rename(f.Name(), filepath.Join(dir, key))
	}
	if werr != nil {
		os.Remove(f.Name())
		return fmt.Errorf("rootfs: tree cache: %w", werr)
	}
	trimTreeCache(dir, treeCacheMax, treeCacheMaxBytes)
	return nil
}

// trimTreeCache keeps the most recently used trees, at most max files and
// maxBytes, and removes temp files of writers that died (older than a
// minute).
func trimTreeCache(dir string, max int, maxBytes int64) {
	des, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	type file struct {
		name string
		mt   time.Time
		size int64
	}
	var files []file
	for _, de := range des {
		fi, err := de.Info()
		if err != nil {
			continue
		}
		if strings.HasPrefix(de.Name(), ".tmp-") {
			if time.Since(fi.ModTime()) > time.Minute {
				os.Remove(filepath.Join(dir, de.Name()))
			}
			continue
		}
		files = append(files, file{de.Name(), fi.ModTime(), fi.Size()})
	}
	sort.Slice(files, func(i, j int) bool { return files[i].mt.After(files[j].mt) })
	var total int64
	for i, f := range files {
		total += f.size
		if i >= max || (i > 0 && total > maxBytes) {
			os.Remove(filepath.Join(dir, f.name))
		}
	}
}

// WarmTree makes sure the tree cache holds the merged tree of layers
// (bottom first), so that even the first container of a chain starts
// without merging: the snapshotter calls it in the background after an
// image's top layer is committed. ms is the store under manifestRoot.
func WarmTree(ctx context.Context, ms *layout.Store, layers []digest.Digest) error {
	root := ms.Dir()
	if _, err := os.Stat(treeCachePath(root, layers)); err == nil {
		return nil
	}
	chain := make([]*layout.Manifest, 0, len(layers))
	for _, d := range layers {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		m, err := ms.Get(ctx, d)
		if err != nil {
			return fmt.Errorf("rootfs: warm tree: layer %s: %w", d, err)
		}
		chain = append(chain, m)
	}
	tree, err := layout.Merge(chain)
	if err != nil {
		return fmt.Errorf("rootfs: warm tree: %w", err)
	}
	fixRoot(tree)
	return storeTreeCache(root, layers, tree)
}

// TreeCached reports whether the tree cache holds the chain layers.
func TreeCached(manifestRoot string, layers []digest.Digest) bool {
	_, err := os.Stat(treeCachePath(manifestRoot, layers))
	return err == nil
}
