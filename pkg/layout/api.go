// Package layout owns the layer manifest: every entry of a layer tar, in
// order, with its metadata and content digest (contents live in pkg/cas),
// plus every non-payload byte of the tar (headers, PAX records, padding,
// end-of-archive) so that the uncompressed tar can be rebuilt byte for byte.
//
// API CONTRACT (shared by every package; do not change exported signatures
// without telling the lead). Function bodies live in other files.
package layout

import (
	"errors"
	"time"

	"github.com/opencontainers/go-digest"
)

// EntryType is the kind of a layer entry (values are tar typeflags).
type EntryType byte

const (
	TypeFile     EntryType = '0'
	TypeHardlink EntryType = '1'
	TypeSymlink  EntryType = '2'
	TypeChar     EntryType = '3'
	TypeBlock    EntryType = '4'
	TypeDir      EntryType = '5'
	TypeFifo     EntryType = '6'
)

// Entry is one member of a layer.
type Entry struct {
	Type EntryType
	// Path is clean and relative ("usr/bin/ls", never "/", "./" or ".." );
	// the layer root itself is "." only if the tar has an entry for it.
	// For whiteouts it is the path being deleted (".wh." already removed).
	Path     string
	Mode     uint32 // permission bits plus setuid/setgid/sticky (07777)
	UID, GID int
	ModTime  time.Time
	// AccessTime and ChangeTime when the tar records them (PAX atime/ctime,
	// GNU header); zero otherwise.
	AccessTime, ChangeTime time.Time
	// Xattrs from PAX SCHILY.xattr.* records (e.g. security.capability).
	Xattrs map[string]string
	// Linkname: symlink target as written, or for TypeHardlink the clean
	// relative path of the entry it links to.
	Linkname           string
	Devmajor, Devminor uint32
	// Size and Digest of the content of a TypeFile entry (an empty file has
	// the digest of zero bytes). Zero for other types.
	Size   int64
	Digest digest.Digest
	// Whiteout: the entry deletes Path from the layers below (.wh.<name>).
	Whiteout bool
	// Opaque: the directory Path hides everything below it (.wh..wh..opq).
	Opaque bool
}

// Manifest describes one layer.
//
//	func (m *Manifest) Objects() []digest.Digest // unique content digests, sorted
//	func (m *Manifest) Marshal() ([]byte, error) // compact, checksummed encoding
//	func Unmarshal(b []byte) (*Manifest, error)  // refuses corrupt/hostile input
//
// Building and rebuilding layers (src is *cas.Store or anything with
// Open(digest.Digest) (io.ReadCloser, error)):
//
//	// Ingest reads a layer (plain tar, gzip or zstd, detected by magic),
//	// puts every file content into the CAS through b (caller commits b), and
//	// returns the manifest with DiffID = sha256 of the uncompressed tar.
//	// Hostile input (path traversal, bad headers, truncation, limits) is
//	// refused with an error wrapping ErrInvalidLayer.
//	func Ingest(ctx context.Context, b *cas.Batch, r io.Reader, opts IngestOptions) (*Manifest, error)
//	// Export writes the exact uncompressed tar; every object is verified
//	// against its digest while streamed (error wraps cas.ErrDigestMismatch).
//	func Export(ctx context.Context, src Source, m *Manifest, w io.Writer) error
//	// FromDir turns an overlay-format upper/staging directory into a manifest
//	// (0/0 char devices = whiteouts, trusted.overlay.opaque / user.overlay.opaque
//	// "y" = opaque dirs), putting contents through b; the tar bytes are
//	// synthesised (sorted, PAX for xattrs) so Export yields a valid layer.
//	func FromDir(ctx context.Context, b *cas.Batch, dir string) (*Manifest, error)
//
// Merged view of a chain (rootfs, snapshot Usage, offload):
//
//	// Merge applies chain[0] (bottom) .. chain[len-1] (top): whiteouts,
//	// opaque dirs, replaced entries; hardlinks share one *Node.
//	func Merge(chain []*Manifest) (*Tree, error)
//	func (t *Tree) Lookup(path string) *Node // nil if absent; "" or "." is root
//
// Durable manifest store, keyed by DiffID, with GC roots for the CAS:
//
//	func OpenStore(dir string, c *cas.Store) (*Store, error)
//	func (s *Store) Import(ctx context.Context, r io.Reader, opts IngestOptions) (*Manifest, error) // lease+batch+ingest+put
//	func (s *Store) Put(ctx context.Context, m *Manifest) error // atomic, fsync'd
//	func (s *Store) Get(ctx context.Context, diffID digest.Digest) (*Manifest, error) // ErrNotFound
//	func (s *Store) Has(diffID digest.Digest) bool
//	func (s *Store) Delete(ctx context.Context, diffID digest.Digest) error
//	func (s *Store) List(ctx context.Context) ([]digest.Digest, error)
//	func (s *Store) Collect(ctx context.Context, grace time.Duration) (objects int, bytes int64, err error)
type Manifest struct {
	DiffID  digest.Digest // sha256 of the uncompressed tar
	Size    int64         // size of the uncompressed tar
	Entries []Entry
	raw     rawLayer // non-payload bytes, unexported
}

// Node is one inode of a merged tree. Hardlinked names share one Node.
type Node struct {
	Entry    Entry            // Entry.Path is the first name; Type is never TypeHardlink
	Children map[string]*Node // directories only, by base name
	Nlink    int
	Ino      uint64 // stable within one Tree, root is 1
}

// Tree is a merged chain of manifests.
type Tree struct {
	Root *Node
}

// IngestOptions bound what a layer may contain.
type IngestOptions struct {
	MaxEntries   int   // 0: 1<<20
	MaxFileSize  int64 // 0: 1<<40
	MaxHeaderLen int64 // 0: 1<<20 (PAX/GNU long name records)
	// MaxSize bounds the uncompressed layer (decompression bombs); 0: 1<<40.
	MaxSize int64
}

var (
	ErrInvalidLayer = errors.New("layout: invalid layer")
	ErrNotFound     = errors.New("layout: manifest not found")
)
