package proxy

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"sync/atomic"
	"time"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/dupsnap/dupsnap/pkg/layout"
	"github.com/dupsnap/dupsnap/proxy/recipe"
)

// sniffFormat names the compression of a layer blob by its magic bytes.
func sniffFormat(f io.ReaderAt) string {
	var b [4]byte
	n, _ := f.ReadAt(b[:], 0)
	switch {
	case n >= 2 && b[0] == 0x1f && b[1] == 0x8b:
		return "gzip"
	case n >= 4 && bytes.Equal(b[:], []byte{0x28, 0xb5, 0x2f, 0xfd}):
		return "zstd"
	}
	return "tar"
}

// ingestLayer decomposes a verified layer blob (f, size bytes) into the file
// CAS and a layout manifest. A compressed blob is also retained until a
// recipe that rebuilds it exactly is found (in the background). A layer
// that layout refuses (path traversal, bad headers, ...) is rejected and
// leaves nothing behind.
func (s *Server) ingestLayer(ctx context.Context, d digest.Digest, mediaType string, f *os.File, size int64) (*layerRecord, error) {
	if rec, err := s.layerRecord(ctx, d); err == nil {
		return rec, nil
	}
	start := time.Now()
	format := sniffFormat(f)
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return nil, err
	}
	release, err := s.files.Lease(ctx)
	if err != nil {
		return nil, fmt.Errorf("ingesting layer %s: %w", d, err)
	}
	defer release()
	m, err := s.files.Import(ctx, f)
	if err != nil {
		if errors.Is(err, layout.ErrInvalidLayer) {
			s.m.ingests.WithLabelValues("rejected").Inc()
			log.G(ctx).WithError(err).WithField("digest", d).Warn("upstream layer rejected")
			return nil, newErr(http.StatusBadGateway, codeBlobUnknown, "upstream layer "+d.String()+" rejected", err)
		}
		return nil, fmt.Errorf("ingesting layer %s: %w", d, err)
	}
	rec := &layerRecord{Digest: d, MediaType: mediaType, Size: size, DiffID: m.DiffID, Format: format, Ingested: time.Now()}
	if format == "tar" {
		if d.Algorithm() == m.DiffID.Algorithm() && d != m.DiffID {
			return nil, fmt.Errorf("layer %s: uncompressed blob ingested as diffID %s", d, m.DiffID)
		}
		s.m.ingests.WithLabelValues("tar").Inc()
	} else {
		if _, err := f.Seek(0, io.SeekStart); err != nil {
			return nil, err
		}
		if err := s.blobs.Put(ctx, d, size, f); err != nil {
			return nil, fmt.Errorf("retaining layer %s: %w", d, err)
		}
		rec.Retained = true
		s.m.ingests.WithLabelValues("retained").Inc()
	}
	// Another replica may have ingested the same layer meanwhile (and even
	// replaced its retained blob by a recipe): its record wins.
	b, err := json.Marshal(rec)
	if err != nil {
		return nil, err
	}
	if err := s.meta.Create(ctx, "layers/"+digestKey(d), b); err != nil {
		if errors.Is(err, errExists) {
			won, err := s.layerRecord(ctx, d)
			if err == nil && rec.Retained && !won.Retained {
				_ = s.blobs.Delete(ctx, d) // the winner found a recipe: ours is surplus
			}
			return won, err
		}
		return nil, fmt.Errorf("writing layer record %s: %w", d, err)
	}
	log.G(ctx).WithField("digest", d).WithField("diffID", m.DiffID).WithField("format", format).
		WithField("entries", len(m.Entries)).WithField("took", time.Since(start)).Info("layer ingested")
	if rec.Retained {
		s.queueRecipe(d)
	}
	return rec, nil
}

func (s *Server) queueRecipe(d digest.Digest) {
	s.pending.Add(1)
	select {
	case s.recipeQ <- d:
	default:
		s.pending.Done() // retried at the next start (requeueRecipes)
	}
}

// requeueRecipes queues retained layers that were never tried (crash, full queue).
func (s *Server) requeueRecipes(ctx context.Context) {
	keys, err := s.meta.List(ctx, "layers")
	if err != nil {
		return
	}
	for _, k := range keys {
		var rec layerRecord
		if s.getJSON(ctx, k, &rec) == nil && rec.Retained && !rec.RecipeTried {
			s.queueRecipe(rec.Digest)
		}
	}
}

func (s *Server) recipeWorker() {
	defer s.wg.Done()
	for {
		select {
		case <-s.ctx.Done():
			return
		case d := <-s.recipeQ:
			if err := s.detectRecipe(s.ctx, d); err != nil && s.ctx.Err() == nil {
				log.G(s.ctx).WithError(err).WithField("digest", d).Warn("recipe detection failed; compressed blob stays retained")
			}
			s.pending.Done()
		}
	}
}

// exportPipe streams the layer's uncompressed tar from the store.
func (s *Server) exportPipe(ctx context.Context, m *layout.Manifest) io.ReadCloser {
	pr, pw := io.Pipe()
	go func() { pw.CloseWithError(layout.Export(ctx, s.exportSource(ctx, m), m, pw)) }()
	return pr
}

// recipeHook, set by tests only, runs before a found recipe replaces the
// retained blob (to line a race up).
var recipeHook atomic.Pointer[func(digest.Digest)]

// detectRecipe tries to replace a retained compressed blob by a recipe.
func (s *Server) detectRecipe(ctx context.Context, d digest.Digest) error {
	rec, err := s.layerRecord(ctx, d)
	if err != nil || !rec.Retained || rec.RecipeTried {
		return nil
	}
	m, err := s.files.GetLayout(ctx, rec.DiffID)
	if err != nil {
		return err
	}
	f, size, err := s.localBlob(ctx, d)
	if err != nil {
		return err
	}
	defer f.Close()
	ra := f
	start := time.Now()
	r, err := recipe.Detect(ctx, ra, size, d, func() (io.ReadCloser, error) { return s.exportPipe(ctx, m), nil })
	if err != nil {
		return err
	}
	rec.RecipeTried = true
	if r == nil {
		log.G(ctx).WithField("digest", d).WithField("took", time.Since(start)).Info("no recipe reproduces the layer: compressed blob retained")
		return s.putJSON(ctx, "layers/"+digestKey(d), rec)
	}
	b, err := r.Marshal()
	if err != nil {
		return err
	}
	if h := recipeHook.Load(); h != nil {
		(*h)(d)
	}
	rec.Recipe, rec.Retained = b, false
	if err := s.putJSON(ctx, "layers/"+digestKey(d), rec); err != nil {
		return err
	}
	s.m.ingests.WithLabelValues("recipe").Inc()
	log.G(ctx).WithField("digest", d).WithField("format", r.Format).WithField("took", time.Since(start)).Info("layer restorable by recipe: compressed blob dropped")
	return s.blobs.Delete(ctx, d)
}

func exportTo(ctx context.Context, s *Server, m *layout.Manifest, w io.Writer) error {
	return layout.Export(ctx, s.exportSource(ctx, m), m, w)
}

// exportSource reads m's objects ahead when the backend is remote.
func (s *Server) exportSource(ctx context.Context, m *layout.Manifest) layout.Source {
	if p, ok := s.files.(interface {
		Prefetch(context.Context, *layout.Manifest) layout.Source
	}); ok {
		return p.Prefetch(ctx, m)
	}
	return s.files
}

// localBlob returns a retained blob as a local file for detection, which
// reads at many offsets: the restore cache's copy when this replica fetched
// it, else a temp copy of a remote backend's blob (unlinked: gone on close).
func (s *Server) localBlob(ctx context.Context, d digest.Digest) (*os.File, int64, error) {
	if f := s.cache.open(d); f != nil {
		fi, err := f.Stat()
		if err == nil {
			return f, fi.Size(), nil
		}
		f.Close()
	}
	rc, size, err := s.blobs.Open(ctx, d)
	if err != nil {
		return nil, 0, err
	}
	defer rc.Close()
	if f, ok := rc.(*os.File); ok {
		lf, err := os.Open(f.Name())
		return lf, size, err
	}
	tmp, err := s.cache.tempFile()
	if err != nil {
		return nil, 0, err
	}
	os.Remove(tmp.Name())
	if _, err := io.Copy(tmp, rc); err != nil {
		tmp.Close()
		return nil, 0, fmt.Errorf("downloading blob %s: %w", d, err)
	}
	return tmp, size, nil
}
