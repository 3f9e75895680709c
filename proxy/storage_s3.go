package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/dupsnap/dupsnap/proxy/s3store"
)

// Keys of the S3 backend (under the configured prefix):
//
//	blobs/<alg>/<hex>        BlobStore: manifests, configs, retained layers
//	meta/<key>               MetaStore records (see meta.go)
//	objects/sha256/<hex>     file objects, zstd-compressed (metadata: size, enc)
//	layouts/sha256/<hex>     layout manifests by diffID
//	locks/{lease,gc}-<id>    ingest leases and GC locks (s3locks.go)

func s3NotFound(err error) error {
	if errors.Is(err, s3store.ErrNotFound) {
		return errNotFound
	}
	return err
}

// s3BlobStore keeps blobs as S3 objects; writes are create-only (or same
// content, which the digest key guarantees) so replicas never clobber.
type s3BlobStore struct {
	b *s3store.Bucket
	// refresh: an existing blob older than this is touched when put again,
	// so a concurrent GC's grace period counts from the latest use.
	refresh time.Duration
}

func blobKey(d digest.Digest) (string, error) {
	if err := d.Validate(); err != nil {
		return "", err
	}
	return "blobs/" + digestKey(d), nil
}

func (s *s3BlobStore) Stat(ctx context.Context, d digest.Digest) (int64, error) {
	k, err := blobKey(d)
	if err != nil {
		return 0, err
	}
	i, err := s.b.Head(ctx, k)
	if err != nil {
		return 0, s3NotFound(err)
	}
	return i.Size, nil
}

func (s *s3BlobStore) Open(ctx context.Context, d digest.Digest) (io.ReadSeekCloser, int64, error) {
	k, err := blobKey(d)
	if err != nil {
		return nil, 0, err
	}
	i, err := s.b.Head(ctx, k)
	if err != nil {
		return nil, 0, s3NotFound(err)
	}
	return &s3Reader{ctx: context.WithoutCancel(ctx), b: s.b, key: k, size: i.Size}, i.Size, nil
}

func (s *s3BlobStore) Put(ctx context.Context, d digest.Digest, size int64, r io.Reader) error {
	k, err := blobKey(d)
	if err != nil {
		return err
	}
	if i, err := s.b.Head(ctx, k); err == nil {
		if time.Since(i.ModTime) > s.refresh {
			return s.b.Touch(ctx, k, nil)
		}
		return nil
	}
	// Verify before uploading: hash a seekable source in place, else spool.
	rs, ok := r.(io.ReadSeeker)
	if !ok {
		tmp, err := os.CreateTemp("", "dupproxy-blob-")
		if err != nil {
			return err
		}
		defer os.Remove(tmp.Name())
		defer tmp.Close()
		if _, err := io.Copy(tmp, r); err != nil {
			return fmt.Errorf("spooling blob %s: %w", d, err)
		}
		rs = tmp
	}
	if _, err := rs.Seek(0, io.SeekStart); err != nil {
		return err
	}
	v := d.Verifier()
	n, err := io.Copy(v, rs)
	if err != nil {
		return fmt.Errorf("reading blob %s: %w", d, err)
	}
	if (size >= 0 && n != size) || !v.Verified() {
		return fmt.Errorf("blob %s: %w (got %d bytes)", d, errDigestMismatch, n)
	}
	if _, err := rs.Seek(0, io.SeekStart); err != nil {
		return err
	}
	if err := s.b.Put(ctx, k, rs, n, nil, true); err != nil && !errors.Is(err, s3store.ErrExists) {
		return fmt.Errorf("storing blob %s: %w", d, err)
	}
	return nil
}

func (s *s3BlobStore) Delete(ctx context.Context, d digest.Digest) error {
	k, err := blobKey(d)
	if err != nil {
		return err
	}
	return s.b.Delete(ctx, k)
}

func (s *s3BlobStore) Walk(ctx context.Context, fn func(digest.Digest, int64, time.Time) error) error {
	return s.b.List(ctx, "blobs/", func(i s3store.Info) error {
		d, ok := keyDigest(i.Key)
		if !ok {
			return nil
		}
		return fn(d, i.Size, i.ModTime)
	})
}

// s3MetaStore keeps each record as one small object (last writer wins, as
// with the local store's rename).
type s3MetaStore struct{ b *s3store.Bucket }

func metaKey(key string) (string, error) {
	if key == "" || strings.HasPrefix(key, "/") || strings.Contains(key, "..") || strings.Contains(key, "//") {
		return "", fmt.Errorf("invalid meta key %q", key)
	}
	return "meta/" + key, nil
}

func (s *s3MetaStore) Get(ctx context.Context, key string) ([]byte, error) {
	k, err := metaKey(key)
	if err != nil {
		return nil, err
	}
	b, err := s.b.ReadAll(ctx, k)
	return b, s3NotFound(err)
}

func (s *s3MetaStore) Put(ctx context.Context, key string, b []byte) error {
	k, err := metaKey(key)
	if err != nil {
		return err
	}
	return s.b.Put(ctx, k, strings.NewReader(string(b)), int64(len(b)), nil, false)
}

func (s *s3MetaStore) Create(ctx context.Context, key string, b []byte) error {
	k, err := metaKey(key)
	if err != nil {
		return err
	}
	err = s.b.Put(ctx, k, strings.NewReader(string(b)), int64(len(b)), nil, true)
	if errors.Is(err, s3store.ErrExists) {
		return errExists
	}
	return err
}

func (s *s3MetaStore) Delete(ctx context.Context, key string) error {
	k, err := metaKey(key)
	if err != nil {
		return err
	}
	return s.b.Delete(ctx, k)
}

func (s *s3MetaStore) List(ctx context.Context, prefix string) ([]string, error) {
	p, err := metaKey(strings.TrimSuffix(prefix, "/"))
	if err != nil {
		return nil, err
	}
	var keys []string
	err = s.b.List(ctx, p+"/", func(i s3store.Info) error {
		keys = append(keys, strings.TrimPrefix(i.Key, "meta/"))
		return nil
	})
	return keys, err
}

// s3Reader reads an S3 object as an io.ReadSeekCloser and io.ReaderAt:
// sequential reads stream one ranged GET from the current offset, ReadAt
// issues its own ranged GET.
type s3Reader struct {
	ctx  context.Context
	b    *s3store.Bucket
	key  string
	size int64
	off  int64
	body io.ReadCloser
}

// s3ReadRetries is how many times a stream cut mid-object (a dropped
// connection, a restarted S3 node) is resumed at its offset before Read
// fails; any progress resets the count.
const s3ReadRetries = 2

func (r *s3Reader) Read(p []byte) (int, error) {
	if r.off >= r.size {
		return 0, io.EOF
	}
	for attempt := 0; ; attempt++ {
		if r.body == nil {
			body, err := r.b.GetRange(r.ctx, r.key, r.off, r.size-r.off)
			if err != nil {
				return 0, s3NotFound(err) // gone since Open: callers may fail over (blobFailover)
			}
			r.body = body
		}
		n, err := r.body.Read(p)
		r.off += int64(n)
		if err == io.EOF && r.off < r.size {
			err = io.ErrUnexpectedEOF
		}
		if err == nil || err == io.EOF {
			return n, err
		}
		// The stream broke: the next GetRange resumes it at r.off.
		r.body.Close()
		r.body = nil
		if n > 0 {
			return n, nil
		}
		if attempt >= s3ReadRetries || r.ctx.Err() != nil {
			return 0, err
		}
	}
}

func (r *s3Reader) Seek(off int64, whence int) (int64, error) {
	switch whence {
	case io.SeekCurrent:
		off += r.off
	case io.SeekEnd:
		off += r.size
	}
	if off < 0 {
		return 0, fmt.Errorf("seek before start")
	}
	if off != r.off && r.body != nil {
		r.body.Close()
		r.body = nil
	}
	r.off = off
	return off, nil
}

func (r *s3Reader) ReadAt(p []byte, off int64) (int, error) {
	if off >= r.size {
		return 0, io.EOF
	}
	n := int64(len(p))
	if off+n > r.size {
		n = r.size - off
	}
	body, err := r.b.GetRange(r.ctx, r.key, off, n)
	if err != nil {
		return 0, err
	}
	defer body.Close()
	got, err := io.ReadFull(body, p[:n])
	if err == nil && int64(got) < int64(len(p)) {
		err = io.EOF
	}
	return got, err
}

func (r *s3Reader) Close() error {
	if r.body != nil {
		return r.body.Close()
	}
	return nil
}

func bytesReader(b []byte) io.ReadSeeker { return strings.NewReader(string(b)) }
