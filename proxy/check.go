package proxy

import (
	"context"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sync/errgroup"
)

// CheckReport is what Check found. Problems lists every inconsistency; an
// empty list means every layer record can be served from the store.
type CheckReport struct {
	Layouts  int      `json:"layouts"`
	Objects  int      `json:"objects"`  // distinct objects referenced and verified
	Bytes    int64    `json:"bytes"`    // their logical size
	Layers   int      `json:"layers"`   // layer records checked
	Blobs    int      `json:"blobs"`    // blobs verified
	Problems []string `json:"problems"` // empty: consistent
}

// Check proves the store consistent: every layout manifest's objects exist
// and hash to their names, every layer record's manifest (and retained blob)
// exists, every image's manifest is stored, and every blob hashes to its
// digest. It reads everything, so it
// costs a full download of an S3 store.
func (s *Server) Check(ctx context.Context) (CheckReport, error) {
	var rep CheckReport
	var mu sync.Mutex
	problem := func(f string, a ...any) {
		mu.Lock()
		rep.Problems = append(rep.Problems, fmt.Sprintf(f, a...))
		mu.Unlock()
	}
	var ids []digest.Digest
	err := s.files.WalkLayouts(ctx, func(id digest.Digest, _ int64, _ time.Time) error {
		ids = append(ids, id)
		return nil
	})
	if err != nil {
		return rep, err
	}
	objs := map[digest.Digest]int64{}
	layouts := map[digest.Digest]bool{}
	for _, id := range ids {
		m, err := s.files.GetLayout(ctx, id)
		if err != nil {
			problem("layout %s: %v", id, err)
			continue
		}
		layouts[id] = true
		rep.Layouts++
		for d, n := range m.ObjectSizes() {
			objs[d] = n
		}
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(8)
	for d, n := range objs {
		g.Go(func() error {
			if err := s.verifyObject(gctx, d, n); err != nil {
				problem("object %s: %v", d, err)
			}
			mu.Lock()
			rep.Objects++
			rep.Bytes += n
			mu.Unlock()
			return gctx.Err()
		})
	}
	if err := g.Wait(); err != nil {
		return rep, err
	}
	lkeys, err := s.meta.List(ctx, "layers")
	if err != nil {
		return rep, err
	}
	for _, k := range lkeys {
		var rec layerRecord
		if err := s.getJSON(ctx, k, &rec); err != nil {
			problem("layer record %s: %v", k, err)
			continue
		}
		rep.Layers++
		if !layouts[rec.DiffID] {
			problem("layer %s: layout manifest %s missing", rec.Digest, rec.DiffID)
		}
		if rec.Retained {
			if _, err := s.blobs.Stat(ctx, rec.Digest); err != nil {
				problem("layer %s: retained blob: %v", rec.Digest, err)
			}
		}
	}
	// A manifest is stored before the link that names it.
	imgs, err := s.images(ctx)
	if err != nil {
		return rep, err
	}
	for _, im := range imgs {
		if _, err := s.blobs.Stat(ctx, im.l.Digest); err != nil {
			problem("image %s: stored manifest: %v", im.key, err)
		}
	}
	var blobs []digest.Digest
	err = s.blobs.Walk(ctx, func(d digest.Digest, _ int64, _ time.Time) error {
		blobs = append(blobs, d)
		return nil
	})
	if err != nil {
		return rep, err
	}
	for _, d := range blobs {
		if err := s.verifyBlob(ctx, d); err != nil {
			problem("blob %s: %v", d, err)
		}
		rep.Blobs++
	}
	return rep, nil
}

func (s *Server) verifyObject(ctx context.Context, d digest.Digest, size int64) error {
	rc, err := s.files.Open(d)
	if err != nil {
		return err
	}
	defer rc.Close()
	v := d.Verifier()
	n, err := io.Copy(v, rc)
	if err != nil {
		return err
	}
	if n != size || !v.Verified() {
		return fmt.Errorf("%w (%d bytes, %d in the manifest)", errDigestMismatch, n, size)
	}
	return nil
}

func (s *Server) verifyBlob(ctx context.Context, d digest.Digest) error {
	f, size, err := s.blobs.Open(ctx, d)
	if isNotFound(err) {
		return nil // deleted meanwhile (GC)
	}
	if err != nil {
		return err
	}
	defer f.Close()
	v := d.Verifier()
	n, err := io.Copy(v, f)
	if err != nil {
		return err
	}
	if n != size || !v.Verified() {
		return fmt.Errorf("%w (%d bytes)", errDigestMismatch, n)
	}
	return nil
}
