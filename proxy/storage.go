package proxy

import (
	"context"
	"errors"
	"io"
	"time"

	"github.com/opencontainers/go-digest"
)

// The durable state of dupproxy besides the file CAS and the layout manifests
// sits behind these two small interfaces, so that another backend (e.g. an
// S3 bucket, issue 8) can replace the local filesystem.

// errNotFound is returned by BlobStore and MetaStore for absent entries.
var errNotFound = errors.New("not found")

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
	Delete(ctx context.Context, key string) error
	// List returns every key under prefix (recursively), in no particular order.
	List(ctx context.Context, prefix string) ([]string, error)
}
