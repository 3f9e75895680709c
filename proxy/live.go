package proxy

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"sync"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
)

// liveBlob is a blob being restored into the cache, which clients may read
// while it is written (time to first byte: a cold GET streams instead of
// waiting for the whole restore). Readers only ever see bytes below avail,
// which stays one byte short of the blob until it verified, so a client is
// never sent a complete body that did not hash to its digest: on a failed
// restore the connection is cut and the client sees a short body.
type liveBlob struct {
	size int64

	mu      sync.Mutex
	path    string // the temp file; "" until the restore started
	written int64
	avail   int64
	done    bool
	err     error // why the restore failed (done)
	wake    chan struct{}
}

func newLiveBlob(size int64) *liveBlob { return &liveBlob{size: size, wake: make(chan struct{})} }

// changed wakes readers; mu held.
func (l *liveBlob) changed() {
	close(l.wake)
	l.wake = make(chan struct{})
}

func (l *liveBlob) start(path string) {
	l.mu.Lock()
	l.path = path
	l.changed()
	l.mu.Unlock()
}

// finish publishes the last byte (err == nil: the blob verified) or the
// failure. It must be called before the temp file is renamed or removed.
func (l *liveBlob) finish(err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.done {
		return
	}
	l.done, l.err = true, err
	if err == nil && l.path != "" {
		l.avail = l.written
	}
	l.changed()
}

// writer wraps the temp file: every write is published to readers.
func (l *liveBlob) writer(f io.Writer) io.Writer { return liveWriter{l, f} }

type liveWriter struct {
	l *liveBlob
	f io.Writer
}

func (w liveWriter) Write(p []byte) (int, error) {
	l := w.l
	l.mu.Lock()
	over := l.written+int64(len(p)) > l.size
	l.mu.Unlock()
	if over {
		return 0, fmt.Errorf("restored layer is larger than its %d bytes: %w", l.size, errDigestMismatch)
	}
	n, err := w.f.Write(p)
	l.mu.Lock()
	l.written += int64(n)
	l.avail = min(l.written, l.size-1)
	l.changed()
	l.mu.Unlock()
	return n, err
}

// liveFor returns the live restore of d, creating it if none runs.
func (c *blobCache) liveFor(d digest.Digest, size int64) *liveBlob {
	c.mu.Lock()
	defer c.mu.Unlock()
	if l, ok := c.live[d]; ok {
		return l
	}
	l := newLiveBlob(size)
	c.live[d] = l
	return l
}

func (c *blobCache) dropLive(d digest.Digest, l *liveBlob) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.live[d] == l {
		delete(c.live, d)
	}
}

// serveLive answers a GET (no Range) of a layer blob that is not cached by
// restoring it and streaming the bytes as they come. It returns errNotLive
// before writing anything when the blob should be served the usual way
// (it reached the cache meanwhile).
func (s *Server) serveLive(w http.ResponseWriter, r *http.Request, rec *layerRecord) error {
	ctx := r.Context()
	l := s.cache.liveFor(rec.Digest, rec.Size)
	res := make(chan error, 1)
	go func() {
		err := s.restore(ctx, rec)
		l.finish(err) // no-op if restoreOnce finished it; else it never started
		s.cache.dropLive(rec.Digest, l)
		res <- err
	}()
	// Wait for the restore to start writing (or to end without doing so).
	var f *os.File
	for {
		l.mu.Lock()
		path, done, wake := l.path, l.done, l.wake
		if path != "" && !done {
			var err error
			if f, err = os.Open(path); err != nil {
				f = nil
			}
		}
		l.mu.Unlock()
		if f != nil {
			break
		}
		if done || path != "" {
			// Restored already (or failed): the cache path has it, or the error.
			if err := <-res; err != nil {
				return err
			}
			return errNotLive
		}
		select {
		case <-wake:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	defer f.Close()
	// Headers go out with the first byte, so that a restore failing at once
	// still gets a proper error response.
	for {
		l.mu.Lock()
		avail, done, lerr, wake := l.avail, l.done, l.err, l.wake
		l.mu.Unlock()
		if avail > 0 || (done && lerr == nil) {
			break
		}
		if lerr != nil {
			<-res
			return lerr
		}
		select {
		case <-wake:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	s.m.cacheRequests.WithLabelValues("miss").Inc()
	h := w.Header()
	h.Set("Content-Type", "application/octet-stream")
	h.Set("Docker-Content-Digest", rec.Digest.String())
	h.Set("Etag", `"`+rec.Digest.String()+`"`)
	h.Set("Accept-Ranges", "bytes")
	h.Set("Content-Length", strconv.FormatInt(rec.Size, 10))
	w.WriteHeader(http.StatusOK)
	fl, _ := w.(http.Flusher)
	buf := make([]byte, 256<<10)
	var off int64
	for off < rec.Size {
		l.mu.Lock()
		avail, done, lerr, wake := l.avail, l.done, l.err, l.wake
		l.mu.Unlock()
		if off < avail {
			n, err := f.ReadAt(buf[:min(int64(len(buf)), avail-off)], off)
			if n > 0 {
				if _, werr := w.Write(buf[:n]); werr != nil {
					return nil // client gone; the restore goes on for the cache
				}
				s.m.servedBytes.WithLabelValues("blob").Add(float64(n))
				off += int64(n)
				if fl != nil {
					fl.Flush()
				}
			}
			if err != nil && !errors.Is(err, io.EOF) {
				lerr = err
			} else {
				continue
			}
		}
		if lerr != nil || (done && off < rec.Size && off >= avail) {
			log.G(ctx).WithError(lerr).WithField("digest", rec.Digest).WithField("sent", off).Error("streamed restore failed: cutting the response short")
			panic(http.ErrAbortHandler) // the client sees a truncated body, never a wrong complete one
		}
		select {
		case <-wake:
		case <-ctx.Done():
			return nil
		}
	}
	return nil
}

var errNotLive = errors.New("not restored live")
