package proxy

import (
	"bytes"
	"context"
	"fmt"
	"io"

	"github.com/containerd/log"

	"github.com/dupsnap/dupsnap/proxy/recipe"
)

// upgradeRecipe gives a recipe stored before checkpoints existed its
// checkpoints once the layer was restored (and verified) into the cache, so
// that later cold restores run in parallel: in the background, one at a
// time (a layer skipped now is upgraded after a later restore). It is
// called before the restore is published (Flush then waits for it) and
// returns the function that starts it (true: the blob is cached) or drops
// it; nil when there is nothing to do.
func (s *Server) upgradeRecipe(rec *layerRecord) func(start bool) {
	if rec.Retained || rec.Recipe == nil || s.ctx.Err() != nil {
		return nil
	}
	r, err := recipe.Unmarshal(rec.Recipe)
	if err != nil || !r.Upgradable() || !s.cache.upgrading.CompareAndSwap(false, true) {
		return nil
	}
	s.pending.Add(1)
	return func(start bool) {
		if !start {
			s.cache.upgrading.Store(false)
			s.pending.Done()
			return
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer s.pending.Done()
			defer s.cache.upgrading.Store(false)
			if err := s.upgradeOnce(s.ctx, rec, r); err != nil && s.ctx.Err() == nil {
				log.G(s.ctx).WithError(err).WithField("digest", rec.Digest).Warn("adding checkpoints to a recipe failed; it restores sequentially")
			}
		}()
	}
}

func (s *Server) upgradeOnce(ctx context.Context, rec *layerRecord, r *recipe.Recipe) error {
	f := s.cache.open(rec.Digest)
	if f == nil {
		return nil // evicted already
	}
	defer f.Close()
	m, err := s.files.GetLayout(ctx, rec.DiffID)
	if err != nil {
		return err
	}
	ok, err := r.AddCheckpoints(ctx, f, rec.Size, rec.Digest, func() (io.ReadCloser, error) { return s.exportPipe(ctx, m), nil })
	if err != nil || !ok {
		return err
	}
	b, err := r.Marshal()
	if err != nil {
		return err
	}
	// Under a lease, so that a GC sweep cannot drop the layer between the
	// re-read and the write (and the record is not resurrected).
	release, err := s.files.Lease(ctx)
	if err != nil {
		return fmt.Errorf("upgrading recipe of %s: %w", rec.Digest, err)
	}
	defer release()
	cur, err := s.layerRecord(ctx, rec.Digest)
	if isNotFound(err) || (err == nil && !bytes.Equal(cur.Recipe, rec.Recipe)) {
		return nil // collected, or changed by someone else meanwhile
	}
	if err != nil {
		return err
	}
	cur.Recipe = b
	if err := s.putJSON(ctx, "layers/"+digestKey(rec.Digest), cur); err != nil {
		return err
	}
	log.G(ctx).WithField("digest", rec.Digest).WithField("chunks", r.Chunks()).Info("recipe upgraded with checkpoints: parallel restore")
	return nil
}
