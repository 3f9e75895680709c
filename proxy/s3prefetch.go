package proxy

import (
	"bytes"
	"context"
	"io"
	"sync"

	"github.com/opencontainers/go-digest"

	"github.com/dupsnap/dupsnap/pkg/layout"
)

// Export reads a layer's objects one after another; over S3 every object is
// a round trip, so restoring a layer of many small files is latency bound.
// prefetchSource fetches the objects ahead, in the manifest's order, a
// bounded number and bytes at a time, and hands them to Export from memory.
// Export verifies every object against its digest, as with a local source.
type prefetchSource struct {
	s     *s3FileStore
	ctx   context.Context
	order []digest.Digest
	sizes map[digest.Digest]int64

	mu       sync.Mutex
	next     int // index in order of the next object to start
	inflight int
	bytes    int64
	slots    map[digest.Digest]*prefetched
}

type prefetched struct {
	done chan struct{}
	rc   io.ReadCloser // decoded content in memory, or nil on err
	size int64
	err  error
}

const (
	prefetchObjects = 16
	prefetchBytes   = 32 << 20
	// Bigger objects stream directly: prefetching them buys nothing.
	prefetchMaxObject = 4 << 20
)

// Prefetch returns a layout.Source for exporting m.
func (s *s3FileStore) Prefetch(ctx context.Context, m *layout.Manifest) layout.Source {
	p := &prefetchSource{s: s, ctx: ctx, sizes: m.ObjectSizes(), slots: map[digest.Digest]*prefetched{}}
	seen := map[digest.Digest]bool{}
	for _, e := range m.Entries {
		if e.Type == layout.TypeFile && e.Digest != "" && !seen[e.Digest] && p.sizes[e.Digest] > 0 && p.sizes[e.Digest] <= prefetchMaxObject {
			seen[e.Digest] = true
			p.order = append(p.order, e.Digest)
		}
	}
	p.mu.Lock()
	p.fillLocked()
	p.mu.Unlock()
	return p
}

func (p *prefetchSource) fillLocked() {
	for p.next < len(p.order) && p.inflight < prefetchObjects && p.bytes < prefetchBytes && p.ctx.Err() == nil {
		d := p.order[p.next]
		p.next++
		pf := &prefetched{done: make(chan struct{}), size: p.sizes[d]}
		p.slots[d] = pf
		p.inflight++
		p.bytes += pf.size
		go func() {
			defer close(pf.done)
			rc, err := p.s.Open(d)
			if err != nil {
				pf.err = err
				return
			}
			defer rc.Close()
			b, err := io.ReadAll(rc)
			pf.rc, pf.err = io.NopCloser(bytes.NewReader(b)), err
		}()
	}
}

func (p *prefetchSource) Open(d digest.Digest) (io.ReadCloser, error) {
	p.mu.Lock()
	pf, ok := p.slots[d]
	if ok {
		delete(p.slots, d)
	}
	p.mu.Unlock()
	if !ok {
		return p.s.Open(d) // big, repeated, or an archived form: fetch now
	}
	select {
	case <-pf.done:
	case <-p.ctx.Done():
		return nil, p.ctx.Err()
	}
	p.mu.Lock()
	p.inflight--
	p.bytes -= pf.size
	p.fillLocked()
	p.mu.Unlock()
	if pf.err != nil {
		return nil, pf.err
	}
	return pf.rc, nil
}

// storedOpener opens objects as stored (FileStore.OpenStored).
type storedOpener func(digest.Digest) (rc io.ReadCloser, size, stored int64, zstd bool, err error)

type storedObj struct {
	d            digest.Digest
	rc           io.ReadCloser
	size, stored int64
	zstd         bool
	err          error
	done         chan struct{}
}

// PrefetchStored opens ds as stored, a window ahead, for a consumer that
// opens them in exactly this order (the dedup objects stream); any other
// digest is opened directly. stop releases what was fetched and not used.
func (s *s3FileStore) PrefetchStored(ctx context.Context, ds []digest.Digest) (storedOpener, func()) {
	ctx, cancel := context.WithCancel(ctx)
	ch := make(chan *storedObj, prefetchObjects)
	go func() {
		defer close(ch)
		for _, d := range ds {
			so := &storedObj{d: d, done: make(chan struct{})}
			go func() {
				defer close(so.done)
				rc, size, stored, z, err := s.OpenStored(ctx, d)
				if err == nil && stored <= prefetchMaxObject {
					// Small: read now, so the connection is free for the next.
					b, rerr := io.ReadAll(rc)
					rc.Close()
					rc, err = io.NopCloser(bytes.NewReader(b)), rerr
				}
				so.rc, so.size, so.stored, so.zstd, so.err = rc, size, stored, z, err
			}()
			select {
			case ch <- so:
			case <-ctx.Done():
				<-so.done
				if so.rc != nil {
					so.rc.Close()
				}
				return
			}
		}
	}()
	open := func(d digest.Digest) (io.ReadCloser, int64, int64, bool, error) {
		so, ok := <-ch
		if !ok || so.d != d {
			if ok {
				<-so.done
				if so.rc != nil {
					so.rc.Close()
				}
			}
			return s.OpenStored(ctx, d)
		}
		<-so.done
		return so.rc, so.size, so.stored, so.zstd, so.err
	}
	stop := func() {
		cancel()
		for so := range ch {
			<-so.done
			if so.rc != nil {
				so.rc.Close()
			}
		}
	}
	return open, stop
}
