package proxy

import (
	"context"
	"errors"
	"io"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/dupsnap/dupsnap/pkg/layout"
)

// The durable state of dupproxy besides the file CAS and the layout manifests
// sits behind these two small interfaces, so that another backend (e.g. an
// S3 bucket, issue 8) can replace the local filesystem.

// errNotFound is returned by BlobStore and MetaStore for absent entries.
var errNotFound = errors.New("not found")

// errExists is returned by MetaStore.Create for a taken key.
var errExists = errors.New("already exists")

// BlobStore keeps whole blobs by digest: manifests, configs and the
// compressed layers that no recipe can rebuild. Put verifies the digest.
type BlobStore interface {
	Stat(ctx context.Context, d digest.Digest) (int64, error)
	// Open returns the blob; local backends return an *os.File.
	Open(ctx context.Context, d digest.Digest) (io.ReadSeekCloser, int64, error)
	// Put stores r under d if it hashes to d (and has size if size >= 0).
	Put(ctx context.Context, d digest.Digest, size int64, r io.Reader) error
	Delete(ctx context.Context, d digest.Digest) error
	// Walk visits every blob with its size and modification time.
	Walk(ctx context.Context, fn func(d digest.Digest, size int64, mod time.Time) error) error
}

// MetaStore keeps small records under slash-separated keys built by this
// package from validated names (see keys.go).
type MetaStore interface {
	Get(ctx context.Context, key string) ([]byte, error)
	// Put replaces the record atomically.
	Put(ctx context.Context, key string, b []byte) error
	// Create stores the record unless the key exists (errExists): the first
	// of several replicas ingesting one layer decides its record.
	Create(ctx context.Context, key string, b []byte) error
	Delete(ctx context.Context, key string) error
	// List returns every key under prefix (recursively), in no particular order.
	List(ctx context.Context, prefix string) ([]string, error)
}

// FileStore keeps the file objects (content-addressed, sha256 of the
// uncompressed bytes) and the layout manifests of layers (keyed by diffID)
// that reference them. Implementations: fsFileStore (pkg/cas + pkg/layout
// under the root) and s3FileStore (one bucket shared by replicas).
type FileStore interface {
	// Import ingests an uncompressed tar stream: objects first, then the
	// manifest, so a stored manifest never references a missing object.
	Import(ctx context.Context, r io.Reader) (*layout.Manifest, error)
	GetLayout(ctx context.Context, diffID digest.Digest) (*layout.Manifest, error)
	DeleteLayout(ctx context.Context, diffID digest.Digest) error
	// WalkLayouts visits every manifest with its stored size and modification time.
	WalkLayouts(ctx context.Context, fn func(diffID digest.Digest, size int64, mod time.Time) error) error
	// Open returns an object's content (layout.Source).
	Open(d digest.Digest) (io.ReadCloser, error)
	// OpenStored returns an object as stored: a zstd stream when zstd is set,
	// else the raw content; size is the logical size, stored the stream's.
	OpenStored(ctx context.Context, d digest.Digest) (rc io.ReadCloser, size, stored int64, zstd bool, err error)
	WalkObjects(ctx context.Context, fn func(ObjectInfo) error) error
	// Collect deletes objects no manifest references and older than grace.
	Collect(ctx context.Context, grace time.Duration) (n int, bytes int64, err error)
	// Lease is held by an ingest from its first write until the records
	// that keep what it wrote exist; Exclusive by the GC sweep. They exclude
	// each other (across replicas for a shared backend).
	Lease(ctx context.Context) (release func(), err error)
	Exclusive(ctx context.Context) (release func(), err error)
	Close() error
}

// ObjectInfo describes a stored file object.
type ObjectInfo struct {
	Digest  digest.Digest
	Size    int64 // logical
	Stored  int64 // in the backend
	ModTime time.Time
}

// Backend is where all durable state of dupproxy lives.
type Backend struct {
	Blobs BlobStore
	Meta  MetaStore
	Files FileStore
}
