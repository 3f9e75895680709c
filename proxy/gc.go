package proxy

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
)

// GCReport says what a collection removed.
type GCReport struct {
	ImagesEvicted  int
	LayersDropped  int
	BlobsDeleted   int
	BlobBytesFreed int64
	Objects        int
	ObjectBytes    int64
	PhysicalBefore int64
	PhysicalAfter  int64
}

type imageRef struct {
	key string
	l   manifestLink
}

// GC evicts the least recently pulled images while the store is over
// StoreSize, then removes every layer, blob and file object that no kept
// manifest references (objects younger than GCGrace are kept).
func (s *Server) GC(ctx context.Context) (GCReport, error) {
	var rep GCReport
	st, err := s.Stats(ctx)
	if err != nil {
		return rep, err
	}
	rep.PhysicalBefore = st.PhysicalBytes
	for round := 0; round < 20; round++ {
		if err := s.sweep(ctx, &rep); err != nil {
			return rep, err
		}
		st, err := s.Stats(ctx)
		if err != nil {
			return rep, err
		}
		rep.PhysicalAfter = st.PhysicalBytes
		if s.cfg.StoreSize <= 0 || st.PhysicalBytes <= int64(s.cfg.StoreSize) {
			break
		}
		n, err := s.evictOldest(ctx, st.PhysicalBytes-int64(s.cfg.StoreSize), st.Images)
		if err != nil {
			return rep, err
		}
		if n == 0 {
			break
		}
		rep.ImagesEvicted += n
	}
	log.G(ctx).WithField("report", fmt.Sprintf("%+v", rep)).Info("gc")
	return rep, nil
}

func (s *Server) images(ctx context.Context) ([]imageRef, error) {
	keys, err := s.meta.List(ctx, "repos")
	if err != nil {
		return nil, err
	}
	var out []imageRef
	for _, k := range keys {
		if !strings.Contains(k, "/_manifests/") {
			continue
		}
		var l manifestLink
		if s.getJSON(ctx, k, &l) == nil {
			out = append(out, imageRef{k, l})
		}
	}
	return out, nil
}

// evictOldest drops whole images by last access: a share of them
// proportional to how far over the bound the store is (at least one).
func (s *Server) evictOldest(ctx context.Context, over int64, _ int) (int, error) {
	imgs, err := s.images(ctx)
	if err != nil || len(imgs) == 0 {
		return 0, err
	}
	sort.Slice(imgs, func(i, j int) bool { return imgs[i].l.LastAccess.Before(imgs[j].l.LastAccess) })
	n := len(imgs) / 10
	if n < 1 {
		n = 1
	}
	for _, im := range imgs[:n] {
		repo := im.key[:strings.Index(im.key, "/_manifests/")]
		if err := s.meta.Delete(ctx, im.key); err != nil {
			return 0, err
		}
		// Tags pointing at it and the repo's links that no other image keeps.
		tags, _ := s.meta.List(ctx, repo+"/_tags")
		for _, t := range tags {
			var tr tagRecord
			if s.getJSON(ctx, t, &tr) == nil && tr.Digest == im.l.Digest {
				_ = s.meta.Delete(ctx, t)
			}
		}
		log.G(ctx).WithField("image", repo+"@"+im.l.Digest.String()).WithField("lastAccess", im.l.LastAccess).Info("evicting image")
	}
	_ = over
	return n, s.relinkRepos(ctx)
}

// relinkRepos removes blob links that no remaining manifest of their
// repository references (after evictions).
func (s *Server) relinkRepos(ctx context.Context) error {
	imgs, err := s.images(ctx)
	if err != nil {
		return err
	}
	keep := map[string]bool{}
	for _, im := range imgs {
		repo := im.key[:strings.Index(im.key, "/_manifests/")]
		for _, d := range im.l.Layers {
			keep[repo+"/_blobs/"+digestKey(d.Digest)] = true
		}
		if im.l.Config != nil {
			keep[repo+"/_blobs/"+digestKey(im.l.Config.Digest)] = true
		}
	}
	keys, err := s.meta.List(ctx, "repos")
	if err != nil {
		return err
	}
	for _, k := range keys {
		if strings.Contains(k, "/_blobs/") && !keep[k] {
			_ = s.meta.Delete(ctx, k)
		}
	}
	return nil
}

// sweep deletes what no manifest link references.
func (s *Server) sweep(ctx context.Context, rep *GCReport) error {
	release, err := s.files.Exclusive(ctx)
	if err != nil {
		return fmt.Errorf("gc: %w", err)
	}
	defer release()
	imgs, err := s.images(ctx)
	if err != nil {
		return err
	}
	keep := map[digest.Digest]bool{}
	for _, im := range imgs {
		keep[im.l.Digest] = true
		for _, d := range im.l.Layers {
			keep[d.Digest] = true
		}
		if im.l.Config != nil {
			keep[im.l.Config.Digest] = true
		}
	}
	// Blobs linked directly (HEAD-verified) stay while their link does.
	keys, err := s.meta.List(ctx, "repos")
	if err != nil {
		return err
	}
	for _, k := range keys {
		if strings.Contains(k, "/_blobs/") {
			if d, ok := keyDigest(k); ok {
				keep[d] = true
			}
		}
	}
	grace := time.Duration(s.cfg.GCGrace)
	keepDiff := map[digest.Digest]bool{}
	lkeys, err := s.meta.List(ctx, "layers")
	if err != nil {
		return err
	}
	for _, k := range lkeys {
		var rec layerRecord
		if err := s.getJSON(ctx, k, &rec); err != nil {
			continue
		}
		if keep[rec.Digest] || time.Since(rec.Ingested) < grace {
			keepDiff[rec.DiffID] = true
			continue
		}
		if err := s.meta.Delete(ctx, k); err != nil {
			return err
		}
		s.cache.remove(rec.Digest)
		rep.LayersDropped++
	}
	// A manifest younger than grace may belong to an ingest whose layer
	// record is not written yet (another replica's, or a crashed one).
	var deadDiffs []digest.Digest
	err = s.files.WalkLayouts(ctx, func(id digest.Digest, _ int64, mod time.Time) error {
		if !keepDiff[id] && time.Since(mod) >= grace {
			deadDiffs = append(deadDiffs, id)
		}
		return nil
	})
	if err != nil {
		return err
	}
	for _, id := range deadDiffs {
		if err := s.files.DeleteLayout(ctx, id); err != nil {
			return err
		}
	}
	var dead []digest.Digest
	var deadBytes int64
	err = s.blobs.Walk(ctx, func(d digest.Digest, size int64, mod time.Time) error {
		if !keep[d] && time.Since(mod) >= grace {
			dead = append(dead, d)
			deadBytes += size
		}
		return nil
	})
	if err != nil {
		return err
	}
	for _, d := range dead {
		if err := s.blobs.Delete(ctx, d); err != nil {
			return err
		}
	}
	rep.BlobsDeleted += len(dead)
	rep.BlobBytesFreed += deadBytes
	n, b, err := s.files.Collect(ctx, grace)
	if err != nil {
		return fmt.Errorf("collecting objects: %w", err)
	}
	rep.Objects += n
	rep.ObjectBytes += b
	return nil
}
