package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
)

// getBlob serves GET/HEAD /v2/<name>/blobs/<digest> (Range included) from the
// restore cache, the store, or the upstream.
func (s *Server) getBlob(w http.ResponseWriter, r *http.Request, rc *reqCtx, d digest.Digest) error {
	ctx := r.Context()
	link, err := s.authorizeBlob(ctx, rc, d)
	if err != nil {
		return err
	}
	if r.Method == http.MethodGet && r.Header.Get("Range") == "" && link.Size >= 0 && !s.cache.has(d) {
		// A layer rebuilt from the store: stream it while it is restored.
		if rec, err := s.layerRecord(ctx, d); err == nil && !rec.Retained {
			if err := s.serveLive(w, r, rec); err == nil {
				return nil
			} else if !errors.Is(err, errNotLive) {
				return s.offline(err, codeBlobUnknown) // nothing was written yet
			}
		}
	}
	f, err := s.openBlob(ctx, rc, d, link)
	if err != nil {
		return s.offline(err, codeBlobUnknown)
	}
	defer f.Close()
	if link.Size < 0 {
		// Fetched through this repository: it may serve the blob from now on.
		if err := s.putJSON(ctx, rc.repo+"/_blobs/"+digestKey(d), blobLink{}); err != nil {
			return err
		}
	}
	h := w.Header()
	h.Set("Content-Type", "application/octet-stream")
	h.Set("Docker-Content-Digest", d.String())
	h.Set("Etag", `"`+d.String()+`"`)
	h.Set("Accept-Ranges", "bytes")
	cw := &countingWriter{ResponseWriter: w}
	// ServeContent does Range (206), unsatisfiable ranges (416) and HEAD.
	http.ServeContent(cw, r, "", time.Time{}, f)
	s.m.servedBytes.WithLabelValues("blob").Add(float64(cw.n))
	return nil
}

type countingWriter struct {
	http.ResponseWriter
	n int64
}

// ReadFrom keeps the ResponseWriter's own ReadFrom (sendfile from the cache
// file) reachable through the wrapper.
func (c *countingWriter) ReadFrom(r io.Reader) (int64, error) {
	n, err := io.Copy(c.ResponseWriter, r)
	c.n += n
	return n, err
}

func (c *countingWriter) Write(b []byte) (int, error) {
	n, err := c.ResponseWriter.Write(b)
	c.n += int64(n)
	return n, err
}

// authorizeBlob enforces that a blob is served through a repository only if
// that repository has it: a manifest of the repository referenced it, or the
// upstream confirms it for this repository (then it is linked). The shared
// store never answers for a repository on its own (cf. zot CVE-2024-39897).
func (s *Server) authorizeBlob(ctx context.Context, rc *reqCtx, d digest.Digest) (*blobLink, error) {
	link, err := s.blobLinkOf(ctx, rc.repo, d)
	if err == nil {
		if err := s.checkAccess(ctx, rc, "blobs", d); err != nil {
			return nil, err
		}
		return link, nil
	}
	if !isNotFound(err) {
		return nil, err
	}
	if !s.haveBlob(ctx, d) {
		// Not stored at all: the upstream fetch itself is the check.
		return &blobLink{Size: -1}, nil
	}
	size, err := rc.up.headBlob(ctx, rc.auth, rc.name, d)
	if err != nil {
		s.m.upstreamErrors.WithLabelValues("head").Inc()
		return nil, err
	}
	link = &blobLink{Size: size}
	if err := s.putJSON(ctx, rc.repo+"/_blobs/"+digestKey(d), link); err != nil {
		return nil, err
	}
	return link, nil
}

func (s *Server) haveBlob(ctx context.Context, d digest.Digest) bool {
	if s.cache.has(d) {
		return true
	}
	if _, err := s.layerRecord(ctx, d); err == nil {
		return true
	}
	_, err := s.blobs.Stat(ctx, d)
	return err == nil
}

// openBlob returns the blob's bytes as a seekable file.
func (s *Server) openBlob(ctx context.Context, rc *reqCtx, d digest.Digest, link *blobLink) (io.ReadSeekCloser, error) {
	// Hit: the cache holds only verified blobs and the caller authorized d,
	// so no record is read; the *os.File lets ServeContent use sendfile.
	if f := s.cache.open(d); f != nil {
		s.m.cacheRequests.WithLabelValues("hit").Inc()
		return f, nil
	}
	rec, recErr := s.layerRecord(ctx, d)
	if recErr == nil {
		s.m.cacheRequests.WithLabelValues("miss").Inc()
		if rec.Retained {
			f, _, err := s.blobs.Open(ctx, d)
			if err == nil {
				return s.failover(ctx, d, f), nil
			}
		}
		if err := s.restore(ctx, rec); err != nil {
			return nil, err
		}
		if f := s.cache.open(d); f != nil {
			return f, nil
		}
		return nil, fmt.Errorf("restored blob %s vanished from the cache (cache too small?)", d)
	}
	if f, _, err := s.blobs.Open(ctx, d); err == nil {
		return f, nil
	}
	if err := s.fetchBlob(ctx, rc, d, link); err != nil {
		return nil, err
	}
	if f := s.cache.open(d); f != nil {
		return f, nil
	}
	f, _, err := s.blobs.Open(ctx, d)
	if err != nil {
		return nil, fmt.Errorf("fetched blob %s not found in store: %w", d, err)
	}
	return f, nil
}

// isLayerMediaType: blobs that are decomposed into the file store.
func isLayerMediaType(mt string) bool {
	return strings.Contains(mt, ".layer.") || strings.Contains(mt, "rootfs.diff")
}

// fetchBlob downloads d once however many clients miss it at the same time,
// verifies it, and keeps it: layers are ingested (and cached as fetched),
// anything else goes to the blob store as is.
func (s *Server) fetchBlob(ctx context.Context, rc *reqCtx, d digest.Digest, link *blobLink) error {
	_, err, _ := s.sf.Do("fetch:"+d.String(), func() (any, error) {
		// Detached from the first client's request: others wait for it too.
		fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Minute)
		defer cancel()
		return nil, s.fetchBlobOnce(fctx, rc, d, link)
	})
	return err
}

func (s *Server) fetchBlobOnce(ctx context.Context, rc *reqCtx, d digest.Digest, link *blobLink) error {
	size := link.Size
	if size == 0 && link.MediaType == "" {
		size = -1
	}
	body, size, err := rc.up.openBlob(ctx, rc.auth, rc.name, d, size)
	if err != nil {
		s.m.upstreamErrors.WithLabelValues("blob").Inc()
		return err
	}
	defer body.Close()
	tmp, err := s.cache.tempFile()
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()
	v := d.Verifier()
	n, err := io.Copy(io.MultiWriter(tmp, v), io.LimitReader(body, size+1))
	s.m.upstreamBytes.WithLabelValues("blob").Add(float64(n))
	if err != nil {
		s.m.upstreamErrors.WithLabelValues("blob").Inc()
		return newErr(http.StatusBadGateway, codeBlobUnknown, fmt.Sprintf("upstream blob %s broke off after %d bytes", d, n), err)
	}
	if n != size || !v.Verified() {
		s.m.upstreamErrors.WithLabelValues("blob").Inc()
		log.G(ctx).WithField("digest", d).WithField("bytes", n).WithField("expected", size).Warn("upstream sent a blob that does not match its digest: rejected")
		return newErr(http.StatusBadGateway, codeBlobUnknown, fmt.Sprintf("upstream sent %d bytes for %s (%d expected) that do not hash to it: rejected", n, d, size), errDigestMismatch)
	}
	if isLayerMediaType(link.MediaType) {
		if _, err := s.ingestLayer(ctx, d, link.MediaType, tmp, n); err != nil {
			return err
		}
		return s.cache.add(d, tmp.Name(), n)
	}
	if _, err := tmp.Seek(0, io.SeekStart); err != nil {
		return err
	}
	// The blob's link was written before the fetch; the lease keeps a sweep
	// that listed links earlier from judging the new blob.
	release, err := s.files.Lease(ctx)
	if err != nil {
		return fmt.Errorf("storing blob %s: %w", d, err)
	}
	defer release()
	if err := s.blobs.Put(ctx, d, n, tmp); err != nil {
		return fmt.Errorf("storing blob %s: %w", d, err)
	}
	return nil
}

var errNoLayer = errors.New("not a layer of this repository")
