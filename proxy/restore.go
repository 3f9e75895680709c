package proxy

import (
	"context"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/dupsnap/dupsnap/proxy/recipe"
)

// restore rebuilds a layer blob from the store into the restore cache, once
// however many clients ask at the same time. The result must hash back to
// the blob's digest, or nothing is cached.
func (s *Server) restore(ctx context.Context, rec *layerRecord) error {
	_, err, _ := s.sf.Do("restore:"+rec.Digest.String(), func() (any, error) {
		if s.cache.has(rec.Digest) {
			return nil, nil
		}
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Minute)
		defer cancel()
		return nil, s.restoreOnce(rctx, rec)
	})
	return err
}

func (s *Server) restoreOnce(ctx context.Context, rec *layerRecord) error {
	start := time.Now()
	// GETs arriving meanwhile stream the bytes from the temp file (live.go).
	live := s.cache.liveFor(rec.Digest, rec.Size)
	defer s.cache.dropLive(rec.Digest, live)
	tmp, err := s.cache.tempFile()
	if err != nil {
		live.finish(err)
		return err
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()
	live.start(tmp.Name())
	v := rec.Digest.Verifier()
	w := io.MultiWriter(live.writer(tmp), v)
	if err := s.writeLayer(ctx, rec, w); err != nil {
		err = fmt.Errorf("restoring layer %s: %w", rec.Digest, err)
		live.finish(err)
		return err
	}
	fi, err := tmp.Stat()
	if err != nil {
		live.finish(err)
		return err
	}
	if fi.Size() != rec.Size || !v.Verified() {
		log.G(ctx).WithField("digest", rec.Digest).WithField("format", rec.Format).Error("restored layer does not match its digest: store damaged?")
		err := fmt.Errorf("restoring layer %s (%s): %w", rec.Digest, rec.Format, errDigestMismatch)
		live.finish(err)
		return err
	}
	upgrade := s.upgradeRecipe(rec)
	live.finish(nil)
	if err := s.cache.add(rec.Digest, tmp.Name(), fi.Size()); err != nil {
		if upgrade != nil {
			upgrade(false)
		}
		return err
	}
	if upgrade != nil {
		upgrade(true)
	}
	s.m.restoreSeconds.WithLabelValues(rec.Format).Observe(time.Since(start).Seconds())
	log.G(ctx).WithField("digest", rec.Digest).WithField("format", rec.Format).WithField("took", time.Since(start)).Debug("layer restored")
	return nil
}

// writeLayer writes the exact blob bytes of a layer.
func (s *Server) writeLayer(ctx context.Context, rec *layerRecord, w io.Writer) error {
	if rec.Retained {
		f, _, err := s.blobs.Open(ctx, rec.Digest)
		if isNotFound(err) {
			// Another replica found a recipe and dropped the blob since rec was read.
			if cur, rerr := s.layerRecord(ctx, rec.Digest); rerr == nil && !cur.Retained {
				return s.writeLayer(ctx, cur, w)
			}
		}
		if err != nil {
			return err
		}
		f = s.failover(ctx, rec.Digest, f)
		defer f.Close()
		_, err = io.Copy(w, f)
		return err
	}
	m, err := s.files.GetLayout(ctx, rec.DiffID)
	if err != nil {
		return err
	}
	if rec.Format == "tar" {
		return exportTo(ctx, s, m, w)
	}
	if rec.Recipe == nil {
		return fmt.Errorf("compressed layer has neither recipe nor retained blob")
	}
	r, err := recipe.Unmarshal(rec.Recipe)
	if err != nil {
		return err
	}
	// Restore re-compresses in parallel when the recipe has checkpoints,
	// verifies, and opens the tar again only to fall back to one run.
	return r.Restore(ctx, w, func() (io.ReadCloser, error) { return s.exportPipe(ctx, m), nil }, rec.Digest)
}

// predictJob restores the layers of an image ahead of the client's blob GETs.
type predictJob struct {
	layers []digest.Digest
}

func (s *Server) predict(rc *reqCtx, l *manifestLink) {
	if !s.cfg.predict() || len(l.Layers) == 0 {
		return
	}
	var job predictJob
	for _, d := range l.Layers {
		if !s.cache.has(d.Digest) {
			job.layers = append(job.layers, d.Digest)
		}
	}
	if len(job.layers) == 0 {
		return
	}
	s.pending.Add(1)
	select {
	case s.predictQ <- job:
	default:
		s.pending.Done()
	}
}

func (s *Server) predictWorker() {
	defer s.wg.Done()
	for {
		select {
		case <-s.ctx.Done():
			return
		case job := <-s.predictQ:
			for _, d := range job.layers {
				rec, err := s.layerRecord(s.ctx, d)
				if err != nil || rec.Retained || s.cache.has(d) {
					continue // not stored yet, or served from the blob store anyway
				}
				if err := s.restore(s.ctx, rec); err != nil && s.ctx.Err() == nil {
					log.G(s.ctx).WithError(err).WithField("digest", d).Warn("predicted restore failed")
				}
			}
			s.pending.Done()
		}
	}
}
