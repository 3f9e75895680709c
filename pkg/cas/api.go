// Package cas is the node-wide (and dupproxy's) content-addressed store of
// file contents. An object is named by the sha256 of its uncompressed bytes
// and kept as one plain, read-only file under a sharded directory
// (<root>/objects/sha256/<2 hex>/<64 hex>), so a FUSE server can hand the
// object's fd to the kernel for passthrough. With Options.Compress the file
// holds a zstd frame instead (dupproxy: compressed at rest); such objects are
// never used for passthrough.
//
// API CONTRACT (shared by every package; do not change signatures without
// telling the lead). Implementation lives in the other files of this package.
package cas

import (
	"errors"
	"time"

	"github.com/opencontainers/go-digest"
)

var (
	// ErrNotFound: no object with that digest.
	ErrNotFound = errors.New("cas: object not found")
	// ErrDigestMismatch: content did not hash to the digest it was put or read under.
	ErrDigestMismatch = errors.New("cas: digest mismatch")
)

// Options configure a Store.
type Options struct {
	// Compress stores new objects as zstd frames (reads decompress).
	Compress bool
	// NoSync skips fsync (tests and benchmarks of the non-durable path only).
	NoSync bool
	// DirectWrites writes streamed objects of a durable, uncompressed
	// store with O_DIRECT (direct.go): no page-cache copy, no writeback
	// left for Commit, new objects not cached. Off by default: slower on
	// the test VM's virtio disk (see direct.go).
	DirectWrites bool
}

// Info describes one stored object.
type Info struct {
	Digest digest.Digest
	Size   int64 // logical (uncompressed) size
	Stored int64 // bytes on disk
	// ModTime of the object file (used as the GC grace reference).
	ModTime    time.Time
	Compressed bool
}

// Store is safe for concurrent use by many goroutines and many processes
// (flock based leases; see Lease and Collect).
//
//	func Open(root string, opts Options) (*Store, error)
//	func (s *Store) Root() string
//	func (s *Store) Close() error
//
// Writing (every put is atomic and crash-safe: temp file, hash while
// writing, fsync, link(2) to the final name (never replacing), dir fsync; a
// put of content already present writes nothing and returns the digest):
//
//	func (s *Store) Put(ctx context.Context, r io.Reader) (digest.Digest, int64, error)
//	// PutExpected verifies the content hashes to want (ErrDigestMismatch otherwise, nothing kept).
//	func (s *Store) PutExpected(ctx context.Context, want digest.Digest, r io.Reader) (int64, error)
//	// NewBatch amortises durability over many puts: objects become visible and
//	// durable at Commit (small batches: parallel fdatasync, one fsync per
//	// touched shard dir; big ones: syncfs, rename all, syncfs - see batch.go).
//	// Every batch must end in Commit or Abort (it holds the shared lock).
//	func (s *Store) NewBatch() *Batch
//	func (b *Batch) Put(ctx context.Context, r io.Reader) (digest.Digest, int64, error)
//	func (b *Batch) PutExpected(ctx context.Context, want digest.Digest, r io.Reader) (int64, error)
//	func (b *Batch) Commit(ctx context.Context) error
//	func (b *Batch) Abort()
//
// Reading:
//
//	func (s *Store) Has(d digest.Digest) bool
//	func (s *Store) Stat(d digest.Digest) (Info, error)
//	// Open returns the object's content (decompressing if stored compressed).
//	func (s *Store) Open(d digest.Digest) (io.ReadCloser, error)
//	// OpenFile returns the read-only *os.File of an uncompressed object
//	// (for passthrough and ReadAt); errors for compressed objects.
//	func (s *Store) OpenFile(d digest.Digest) (*os.File, error)
//	// Path is where the object file is (whether or not it exists).
//	func (s *Store) Path(d digest.Digest) string
//	func (s *Store) Walk(ctx context.Context, fn func(Info) error) error
//
// Removing and collecting (crash-safe reference tracking: the caller owns
// the roots; a put is protected from Collect from the moment its Lease is
// taken until the lease is released, and objects younger than the grace
// period are never collected):
//
//	// Lease takes a shared lock that Collect waits for; hold it from the first
//	// put of a layer until the manifest that references its objects is durable.
//	func (s *Store) Lease(ctx context.Context) (release func(), err error)
//	// Collect deletes every object for which keep returns false and that is
//	// older than grace, under the exclusive lock. Returns objects and bytes freed.
//	func (s *Store) Collect(ctx context.Context, keep func(digest.Digest) bool, grace time.Duration) (n int, bytes int64, err error)
//	func (s *Store) Delete(d digest.Digest) error
//	// Fsck re-hashes every object; with repair, corrupt objects and stale
//	// temp files are removed. Report lists what was found.
//	func (s *Store) Fsck(ctx context.Context, repair bool) (FsckReport, error)
type FsckReport struct {
	Objects   int
	Bytes     int64
	Corrupt   []digest.Digest
	TempFiles int
	Repaired  bool
}
