package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/containerd/log"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sync/errgroup"

	"github.com/dupsnap/dupsnap/pkg/cas"
	"github.com/dupsnap/dupsnap/pkg/layout"
	"github.com/dupsnap/dupsnap/proxy/s3store"
)

// s3FileStore keeps file objects and layout manifests in a bucket shared by
// replicas. A layer is ingested into a private scratch CAS on local disk
// (pkg/layout wants a *cas.Batch), its objects are uploaded create-only
// under their content digest, and the manifest last: whatever a replica
// killed in between leaves is unreferenced and goes at the next GC.
type s3FileStore struct {
	b       *s3store.Bucket
	scratch string
	// refresh: an existing object older than this is touched when an
	// ingest reuses it, so GC's grace period counts from the reuse.
	refresh time.Duration
	locks   *bucketLocks
}

const (
	metaSize = "dupsnap-size" // logical size of an object
	metaEnc  = "dupsnap-enc"  // "zstd" or "raw"
)

func newS3FileStore(ctx context.Context, b *s3store.Bucket, scratch string, cfg Config) (*s3FileStore, error) {
	// Scratch is private to this replica (its root is flocked): leftovers
	// of a killed run are garbage.
	if err := os.RemoveAll(scratch); err != nil {
		return nil, fmt.Errorf("clearing scratch: %w", err)
	}
	if err := os.MkdirAll(scratch, 0o700); err != nil {
		return nil, fmt.Errorf("creating scratch: %w", err)
	}
	s := &s3FileStore{b: b, scratch: scratch, refresh: time.Duration(cfg.GCGrace) / 2,
		locks: &bucketLocks{b: b, ttl: time.Duration(cfg.Storage.LeaseTTL)}}
	// Fail at start, not at the first pull, when the bucket is unreachable.
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := b.List(cctx, "locks/", func(s3store.Info) error { return nil }); err != nil {
		return nil, fmt.Errorf("bucket %s: %w", b.Name(), err)
	}
	return s, nil
}

func objectKey(d digest.Digest) (string, error) {
	if d.Algorithm() != digest.SHA256 || d.Validate() != nil {
		return "", fmt.Errorf("invalid object digest %q", d)
	}
	return "objects/" + digestKey(d), nil
}

func layoutKey(id digest.Digest) (string, error) {
	if id.Algorithm() != digest.SHA256 || id.Validate() != nil {
		return "", fmt.Errorf("invalid diffID %q: %w", id, layout.ErrNotFound)
	}
	return "layouts/" + digestKey(id), nil
}

func (s *s3FileStore) Import(ctx context.Context, r io.Reader) (*layout.Manifest, error) {
	dir, err := os.MkdirTemp(s.scratch, "import-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	c, err := cas.Open(dir, cas.Options{Compress: true, NoSync: true})
	if err != nil {
		return nil, fmt.Errorf("opening scratch CAS: %w", err)
	}
	defer c.Close()
	batch := c.NewBatch()
	m, err := layout.Ingest(ctx, batch, r, layout.IngestOptions{})
	if err != nil {
		batch.Abort()
		return nil, err
	}
	if err := batch.Commit(ctx); err != nil {
		return nil, fmt.Errorf("scratch commit: %w", err)
	}
	start := time.Now()
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(8) // requests, not CPU: uploads wait on the network
	var uploaded, reused atomic.Int64
	for d := range m.ObjectSizes() {
		g.Go(func() error {
			up, err := s.upload(gctx, c, d)
			if up {
				uploaded.Add(1)
			} else {
				reused.Add(1)
			}
			return err
		})
	}
	if err := g.Wait(); err != nil {
		return nil, fmt.Errorf("layer %s: uploading objects: %w", m.DiffID, err)
	}
	b, err := m.Marshal()
	if err != nil {
		return nil, err
	}
	k, err := layoutKey(m.DiffID)
	if err != nil {
		return nil, err
	}
	// Same diffID, same manifest: an overwrite by another replica is harmless
	// and refreshes the manifest's grace period.
	if err := s.b.Put(ctx, k, bytesReader(b), int64(len(b)), nil, false); err != nil {
		return nil, fmt.Errorf("layer %s: storing manifest: %w", m.DiffID, err)
	}
	log.G(ctx).WithField("diffID", m.DiffID).WithField("uploaded", uploaded.Load()).WithField("reused", reused.Load()).
		WithField("took", time.Since(start)).Debug("layer stored in bucket")
	return m, nil
}

// upload stores one object unless the bucket has it; it reports whether it
// wrote.
func (s *s3FileStore) upload(ctx context.Context, c *cas.Store, d digest.Digest) (bool, error) {
	k, err := objectKey(d)
	if err != nil {
		return false, err
	}
	info, err := c.Stat(d)
	if err != nil {
		return false, err
	}
	meta := map[string]string{metaSize: strconv.FormatInt(info.Size, 10), metaEnc: "raw"}
	if i, err := s.b.Head(ctx, k); err == nil {
		if time.Since(i.ModTime) > s.refresh {
			return false, s.b.Touch(ctx, k, i.Meta)
		}
		return false, nil
	}
	var f *os.File
	if info.Compressed {
		// The scratch file is a valid zstd stream: upload it as is.
		meta[metaEnc] = "zstd"
		f, err = os.Open(c.Path(d))
	} else {
		f, err = c.OpenFile(d)
	}
	if err != nil {
		return false, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return false, err
	}
	err = s.b.Put(ctx, k, f, fi.Size(), meta, true)
	if errors.Is(err, s3store.ErrExists) {
		return false, nil // another replica won the race with the same bytes
	}
	return err == nil, err
}

func (s *s3FileStore) GetLayout(ctx context.Context, id digest.Digest) (*layout.Manifest, error) {
	k, err := layoutKey(id)
	if err != nil {
		return nil, err
	}
	b, err := s.b.ReadAll(ctx, k)
	if errors.Is(err, s3store.ErrNotFound) {
		return nil, fmt.Errorf("%s: %w", id, layout.ErrNotFound)
	}
	if err != nil {
		return nil, err
	}
	m, err := layout.Unmarshal(b)
	if err != nil {
		return nil, fmt.Errorf("manifest %s: %w", id, err)
	}
	if m.DiffID != id {
		return nil, fmt.Errorf("manifest %s: %w: describes %s", id, layout.ErrCorruptManifest, m.DiffID)
	}
	return m, nil
}

func (s *s3FileStore) DeleteLayout(ctx context.Context, id digest.Digest) error {
	k, err := layoutKey(id)
	if err != nil {
		return err
	}
	return s.b.Delete(ctx, k)
}

func (s *s3FileStore) WalkLayouts(ctx context.Context, fn func(digest.Digest, int64, time.Time) error) error {
	return s.b.List(ctx, "layouts/", func(i s3store.Info) error {
		if d, ok := keyDigest(i.Key); ok {
			return fn(d, i.Size, i.ModTime)
		}
		return nil
	})
}

func (s *s3FileStore) Open(d digest.Digest) (io.ReadCloser, error) {
	rc, _, _, z, err := s.OpenStored(context.Background(), d)
	if err != nil || !z {
		return rc, err
	}
	zr, err := zstd.NewReader(rc, zstd.WithDecoderConcurrency(1))
	if err != nil {
		rc.Close()
		return nil, err
	}
	return &zstdReadCloser{zr, rc}, nil
}

type zstdReadCloser struct {
	*zstd.Decoder
	body io.Closer
}

func (z *zstdReadCloser) Close() error {
	z.Decoder.Close()
	return z.body.Close()
}

func (s *s3FileStore) OpenStored(ctx context.Context, d digest.Digest) (io.ReadCloser, int64, int64, bool, error) {
	k, err := objectKey(d)
	if err != nil {
		return nil, 0, 0, false, err
	}
	rc, i, err := s.b.Get(ctx, k)
	if errors.Is(err, s3store.ErrNotFound) {
		return nil, 0, 0, false, fmt.Errorf("%w: %s", cas.ErrNotFound, d)
	}
	if err != nil {
		return nil, 0, 0, false, err
	}
	size, err := strconv.ParseInt(i.Meta[metaSize], 10, 64)
	if err != nil {
		rc.Close()
		return nil, 0, 0, false, fmt.Errorf("object %s: bad size metadata %q", d, i.Meta[metaSize])
	}
	return rc, size, i.Size, i.Meta[metaEnc] == "zstd", nil
}

// WalkObjects lists the bucket; logical sizes come from the manifests
// (a listing carries no metadata), else the stored size is reported.
func (s *s3FileStore) WalkObjects(ctx context.Context, fn func(ObjectInfo) error) error {
	sizes := map[digest.Digest]int64{}
	err := s.WalkLayouts(ctx, func(id digest.Digest, _ int64, _ time.Time) error {
		m, err := s.GetLayout(ctx, id)
		if err != nil {
			return nil // deleted meanwhile
		}
		for d, n := range m.ObjectSizes() {
			sizes[d] = n
		}
		return nil
	})
	if err != nil {
		return err
	}
	return s.b.List(ctx, "objects/", func(i s3store.Info) error {
		d, ok := keyDigest(i.Key)
		if !ok {
			return nil
		}
		n, ok := sizes[d]
		if !ok {
			n = i.Size
		}
		return fn(ObjectInfo{Digest: d, Size: n, Stored: i.Size, ModTime: i.ModTime})
	})
}

// Collect runs under Exclusive (the sweep holds it): no ingest is between
// its first upload and its layer record, so the roots read here are complete.
func (s *s3FileStore) Collect(ctx context.Context, grace time.Duration) (int, int64, error) {
	roots := map[digest.Digest]bool{}
	var rootErr error
	err := s.WalkLayouts(ctx, func(id digest.Digest, _ int64, _ time.Time) error {
		m, err := s.GetLayout(ctx, id)
		if errors.Is(err, layout.ErrNotFound) {
			return nil
		}
		if err != nil {
			rootErr = err // keep everything rather than guess
			return err
		}
		for _, d := range m.Objects() {
			roots[d] = true
		}
		return nil
	})
	if err != nil || rootErr != nil {
		return 0, 0, fmt.Errorf("reading GC roots: %w", errors.Join(err, rootErr))
	}
	var dead []s3store.Info
	err = s.b.List(ctx, "objects/", func(i s3store.Info) error {
		d, ok := keyDigest(i.Key)
		if ok && !roots[d] && time.Since(i.ModTime) >= grace {
			dead = append(dead, i)
		}
		return nil
	})
	if err != nil {
		return 0, 0, err
	}
	var n int
	var freed int64
	for _, i := range dead {
		if err := s.b.Delete(ctx, i.Key); err != nil {
			return n, freed, err
		}
		n++
		freed += i.Size
	}
	s.locks.sweepStale(ctx)
	return n, freed, nil
}

func (s *s3FileStore) Lease(ctx context.Context) (func(), error)     { return s.locks.Lease(ctx) }
func (s *s3FileStore) Exclusive(ctx context.Context) (func(), error) { return s.locks.Exclusive(ctx) }
func (s *s3FileStore) Close() error                                  { return nil }
