package cas

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"sync"

	"github.com/opencontainers/go-digest"
)

// chunkSize is both the pipeline's unit and the "small object" limit:
// content that fits in one chunk is hashed in memory before anything is
// written, so a put of content already present writes nothing.
const chunkSize = 1 << 20

var bufPool = sync.Pool{New: func() any { b := make([]byte, chunkSize); return &b }}

func getBuf() *[]byte  { return bufPool.Get().(*[]byte) }
func putBuf(b *[]byte) { bufPool.Put(b) }

// Put stores r's content durably and returns its digest and size.
func (s *Store) Put(ctx context.Context, r io.Reader) (digest.Digest, int64, error) {
	b := s.NewBatch()
	b.single = true
	d, n, err := b.Put(ctx, r)
	if err != nil {
		b.Abort()
		return "", 0, err
	}
	if err := b.Commit(ctx); err != nil {
		return "", 0, err
	}
	return d, n, nil
}

// PutExpected stores r's content durably if it hashes to want; otherwise
// it returns ErrDigestMismatch and keeps nothing.
func (s *Store) PutExpected(ctx context.Context, want digest.Digest, r io.Reader) (int64, error) {
	b := s.NewBatch()
	b.single = true
	n, err := b.PutExpected(ctx, want, r)
	if err != nil {
		b.Abort()
		return 0, err
	}
	if err := b.Commit(ctx); err != nil {
		return 0, err
	}
	return n, nil
}

// Put adds r's content to the batch; it becomes visible at Commit.
func (b *Batch) Put(ctx context.Context, r io.Reader) (digest.Digest, int64, error) {
	return b.put(ctx, "", r)
}

// PutExpected adds r's content to the batch if it hashes to want.
func (b *Batch) PutExpected(ctx context.Context, want digest.Digest, r io.Reader) (int64, error) {
	if _, err := hexOf(want); err != nil {
		return 0, err
	}
	_, n, err := b.put(ctx, want, r)
	return n, err
}

func (b *Batch) put(ctx context.Context, want digest.Digest, r io.Reader) (digest.Digest, int64, error) {
	b.mu.Lock()
	if b.done {
		b.mu.Unlock()
		return "", 0, errors.New("cas: put on a finished batch")
	}
	if b.werr != nil {
		err := b.werr
		b.mu.Unlock()
		return "", 0, err
	}
	b.inflight.Add(1)
	b.mu.Unlock()
	defer b.inflight.Done()
	if err := ctx.Err(); err != nil {
		return "", 0, err
	}

	// Expected content already stored: verify the stream, write nothing.
	if want != "" && b.present(want) {
		n, err := hashOnly(r, want)
		return want, n, err
	}

	pb := getBuf()
	n, rerr := io.ReadFull(r, *pb)
	switch {
	case rerr == io.EOF || rerr == io.ErrUnexpectedEOF:
		return b.putSmall(ctx, want, pb, n)
	case rerr != nil:
		putBuf(pb)
		return "", 0, fmt.Errorf("cas: read content: %w", rerr)
	}
	return b.putStream(ctx, want, r, pb)
}

func (b *Batch) putSmall(ctx context.Context, want digest.Digest, pb *[]byte, n int) (digest.Digest, int64, error) {
	data := (*pb)[:n]
	sum := sha256.Sum256(data)
	d := digest.NewDigestFromBytes(digest.SHA256, sum[:])
	if want != "" && d != want {
		putBuf(pb)
		return "", 0, mismatch(want, d)
	}
	if b.present(d) {
		putBuf(pb)
		return d, int64(n), nil
	}
	b.mu.Lock()
	if _, ok := b.pending[d]; ok {
		b.mu.Unlock()
		putBuf(pb)
		return d, int64(n), nil
	}
	if err := b.start(ctx); err != nil {
		b.mu.Unlock()
		putBuf(pb)
		return "", 0, err
	}
	t := &tempObj{name: b.s.newTempName(), hex: d.Encoded(), fd: -1}
	b.pending[d] = t
	b.order = append(b.order, t)
	b.mu.Unlock()
	if err := b.send(ctx, job{kind: jobWhole, t: t, data: data, buf: pb}); err != nil {
		b.unregister(d, t)
		return "", 0, err
	}
	return d, int64(n), nil
}

// putStream handles content larger than one chunk: the caller's goroutine
// reads and hashes chunk i+1 while the writer writes chunk i.
func (b *Batch) putStream(ctx context.Context, want digest.Digest, r io.Reader, pb *[]byte) (digest.Digest, int64, error) {
	b.mu.Lock()
	err := b.start(ctx)
	b.mu.Unlock()
	if err != nil {
		putBuf(pb)
		return "", 0, err
	}
	t := &tempObj{name: b.s.newTempName(), fd: -1}
	h := sha256.New()
	var total int64
	n := len(*pb)
	for {
		chunk := (*pb)[:n]
		h.Write(chunk)
		total += int64(n)
		if err := b.send(ctx, job{kind: jobChunk, t: t, data: chunk, buf: pb}); err != nil {
			return "", 0, err // the temp is removed at Commit/Abort
		}
		if err := ctx.Err(); err != nil {
			b.send(ctx, job{kind: jobDiscard, t: t})
			return "", 0, err
		}
		var rerr error
		pb = getBuf()
		n, rerr = io.ReadFull(r, *pb)
		if rerr == io.EOF {
			putBuf(pb)
			break
		}
		if rerr != nil && rerr != io.ErrUnexpectedEOF {
			putBuf(pb)
			b.send(ctx, job{kind: jobDiscard, t: t})
			return "", 0, fmt.Errorf("cas: read content: %w", rerr)
		}
		if rerr == io.ErrUnexpectedEOF && n == 0 {
			putBuf(pb)
			break
		}
	}
	d := digest.NewDigestFromBytes(digest.SHA256, h.Sum(nil))
	if want != "" && d != want {
		b.send(ctx, job{kind: jobDiscard, t: t})
		return "", 0, mismatch(want, d)
	}
	t.hex = d.Encoded()
	kind := jobKeep
	if b.present(d) {
		kind = jobDiscard
	} else {
		b.mu.Lock()
		if _, ok := b.pending[d]; ok {
			kind = jobDiscard
		} else {
			b.pending[d] = t
			b.order = append(b.order, t)
		}
		b.mu.Unlock()
	}
	if err := b.send(ctx, job{kind: kind, t: t}); err != nil {
		if kind == jobKeep {
			b.unregister(d, t)
		}
		return "", 0, err
	}
	return d, total, nil
}

// unregister takes back a temp whose job never reached the writer (ctx
// done): Commit must not try to install it; cleanup removes its file.
func (b *Batch) unregister(d digest.Digest, t *tempObj) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.pending[d] == t {
		delete(b.pending, d)
	}
	for i := len(b.order) - 1; i >= 0; i-- {
		if b.order[i] == t {
			b.order = append(b.order[:i], b.order[i+1:]...)
			break
		}
	}
}

// present reports whether d is already stored; if so, its shard is
// remembered so Commit makes that name durable too.
func (b *Batch) present(d digest.Digest) bool {
	if !b.s.Has(d) {
		return false
	}
	if !b.s.opts.NoSync {
		b.mu.Lock()
		b.hits[d.Encoded()[:2]] = struct{}{}
		b.mu.Unlock()
	}
	return true
}

func hashOnly(r io.Reader, want digest.Digest) (int64, error) {
	pb := getBuf()
	defer putBuf(pb)
	h := sha256.New()
	n, err := io.CopyBuffer(struct{ hash.Hash }{h}, r, *pb)
	if err != nil {
		return 0, fmt.Errorf("cas: read content: %w", err)
	}
	if d := digest.NewDigestFromBytes(digest.SHA256, h.Sum(nil)); d != want {
		return 0, mismatch(want, d)
	}
	return n, nil
}

func mismatch(want, got digest.Digest) error {
	return fmt.Errorf("%w: want %s, got %s", ErrDigestMismatch, want, got)
}
