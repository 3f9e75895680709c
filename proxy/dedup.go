package proxy

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/dupsnap/dupsnap/pkg/cas"
	"github.com/dupsnap/dupsnap/pkg/layout"
)

// The dedup API (documented in docs/dupproxy.md; client in proxy/client).
const (
	// MediaTypeLayoutManifest is the body of a layer manifest response:
	// pkg/layout's compact encoding (Manifest.Marshal).
	MediaTypeLayoutManifest = "application/vnd.dupsnap.layout.manifest.v1"
	// MediaTypeObjects is the framed object stream of an objects response.
	MediaTypeObjects = "application/vnd.dupsnap.objects.v1"

	HeaderLayerDigest = "Dupproxy-Layer-Digest"
	HeaderDiffID      = "Dupproxy-Diff-Id"
	HeaderMediaType   = "Dupproxy-Layer-Media-Type"
	HeaderLayerSize   = "Dupproxy-Layer-Size"

	// ObjectsMagic starts an objects stream.
	ObjectsMagic = "DUPOBJ1\n"
	// Frame encodings.
	FrameRaw  byte = 0
	FrameZstd byte = 1
	FrameEnd  byte = 0xff
)

// ObjectsRequest is the body of POST /dedup/v1/<name>/objects.
type ObjectsRequest struct {
	// Layers of the repository the objects belong to (authorization scope).
	Layers []digest.Digest `json:"layers"`
	// Objects wanted (sha256 file digests).
	Objects []digest.Digest `json:"objects"`
}

const maxLayersPerRequest = 1024

func (s *Server) serveDedup(w http.ResponseWriter, r *http.Request) {
	p := r.URL.Path
	if m := reDedupL.FindStringSubmatch(p); m != nil && (r.Method == http.MethodGet || r.Method == http.MethodHead) {
		s.withRepo(w, r, m[1], func(rc *reqCtx) error {
			d, err := parseDigest(m[2])
			if err != nil {
				return err
			}
			return s.serveLayerManifest(w, r, rc, d)
		})
		return
	}
	if m := reDedupD.FindStringSubmatch(p); m != nil && (r.Method == http.MethodGet || r.Method == http.MethodHead) {
		s.withRepo(w, r, m[1], func(rc *reqCtx) error {
			diffID, err := parseDigest(m[2])
			if err != nil {
				return err
			}
			d, err := s.layerByDiffID(r.Context(), rc, diffID)
			if err != nil {
				return err
			}
			return s.serveLayerManifest(w, r, rc, d)
		})
		return
	}
	if m := reDedupO.FindStringSubmatch(p); m != nil && r.Method == http.MethodPost {
		s.withRepo(w, r, m[1], func(rc *reqCtx) error { return s.serveObjects(w, r, rc) })
		return
	}
	writeError(w, r, newErr(http.StatusNotFound, codeNameUnknown, "no such dedup endpoint (or wrong method)", nil))
}

// authorizedLayer returns the stored layer d if a manifest of the repository
// references it as a layer (ingesting it now if needed).
func (s *Server) authorizedLayer(ctx context.Context, rc *reqCtx, d digest.Digest) (*layerRecord, error) {
	link, err := s.blobLinkOf(ctx, rc.repo, d)
	if err != nil || !link.Layer {
		if err != nil && !isNotFound(err) {
			return nil, err
		}
		// Same answer whether or not another repository has it: no oracle.
		return nil, newErr(http.StatusNotFound, codeBlobUnknown,
			fmt.Sprintf("layer %s is not referenced by a manifest of %s pulled through this proxy", d, rc.name), errNoLayer)
	}
	if err := s.checkAccess(ctx, rc, "blobs", d); err != nil {
		return nil, err
	}
	return s.ensureLayer(ctx, rc, d, link)
}

// ensureLayer makes sure layer d is decomposed in the store.
func (s *Server) ensureLayer(ctx context.Context, rc *reqCtx, d digest.Digest, link *blobLink) (*layerRecord, error) {
	if rec, err := s.layerRecord(ctx, d); err == nil {
		return rec, nil
	}
	// Stored whole (fetched before any manifest said it is a layer).
	if f, size, err := s.blobs.Open(ctx, d); err == nil {
		defer f.Close()
		if of, ok := f.(*os.File); ok {
			_, err, _ := s.sf.Do("ingest:"+d.String(), func() (any, error) {
				return s.ingestLayer(ctx, d, link.MediaType, of, size)
			})
			if err != nil {
				return nil, err
			}
			rec, err := s.layerRecord(ctx, d)
			if err == nil && !rec.Retained {
				_ = s.blobs.Delete(ctx, d) // uncompressed: rebuilt from the store
			}
			return rec, err
		}
	}
	if err := s.fetchBlob(ctx, rc, d, link); err != nil {
		return nil, err
	}
	return s.layerRecord(ctx, d)
}

func (s *Server) serveLayerManifest(w http.ResponseWriter, r *http.Request, rc *reqCtx, d digest.Digest) error {
	ctx := r.Context()
	rec, err := s.authorizedLayer(ctx, rc, d)
	if err != nil {
		return err
	}
	m, err := s.files.GetLayout(ctx, rec.DiffID)
	if err != nil {
		return fmt.Errorf("layer %s: layout manifest %s: %w", d, rec.DiffID, err)
	}
	body, err := m.Marshal()
	if err != nil {
		return err
	}
	h := w.Header()
	h.Set("Content-Type", MediaTypeLayoutManifest)
	h.Set("Content-Length", strconv.Itoa(len(body)))
	h.Set(HeaderLayerDigest, d.String())
	h.Set(HeaderDiffID, rec.DiffID.String())
	h.Set(HeaderMediaType, rec.MediaType)
	h.Set(HeaderLayerSize, strconv.FormatInt(rec.Size, 10))
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodHead {
		return nil
	}
	n, _ := w.Write(body)
	s.m.servedBytes.WithLabelValues("dedup_manifest").Add(float64(n))
	return nil
}

// layerByDiffID finds the layer of the repository whose config lists diffID
// (nerdctl only passes containerd.io/snapshot/diff-id).
func (s *Server) layerByDiffID(ctx context.Context, rc *reqCtx, diffID digest.Digest) (digest.Digest, error) {
	cacheKey := rc.repo + "/_diffids/" + digestKey(diffID)
	if b, err := s.meta.Get(ctx, cacheKey); err == nil {
		if d, err := digest.Parse(string(b)); err == nil {
			return d, nil
		}
	}
	keys, err := s.meta.List(ctx, rc.repo+"/_manifests")
	if err != nil {
		return "", err
	}
	for _, k := range keys {
		var l manifestLink
		if s.getJSON(ctx, k, &l) != nil || l.Config == nil || len(l.Layers) == 0 {
			continue
		}
		cfg, err := s.readConfig(ctx, rc, *l.Config)
		if err != nil {
			log.G(ctx).WithError(err).WithField("config", l.Config.Digest).Debug("config unavailable for diffID lookup")
			continue
		}
		for i, id := range cfg.RootFS.DiffIDs {
			if id == diffID && i < len(l.Layers) {
				d := l.Layers[i].Digest
				_ = s.meta.Put(ctx, cacheKey, []byte(d.String()))
				return d, nil
			}
		}
	}
	return "", newErr(http.StatusNotFound, codeBlobUnknown,
		fmt.Sprintf("no image of %s pulled through this proxy has a layer with diffID %s", rc.name, diffID), errNoLayer)
}

func (s *Server) readConfig(ctx context.Context, rc *reqCtx, desc ocispec.Descriptor) (*ocispec.Image, error) {
	if desc.Size > maxManifestSize {
		return nil, fmt.Errorf("config too large")
	}
	f, _, err := s.blobs.Open(ctx, desc.Digest)
	if err != nil {
		if err := s.fetchBlob(ctx, rc, desc.Digest, &blobLink{MediaType: desc.MediaType, Size: desc.Size}); err != nil {
			return nil, err
		}
		if f, _, err = s.blobs.Open(ctx, desc.Digest); err != nil {
			return nil, err
		}
	}
	defer f.Close()
	var img ocispec.Image
	if err := json.NewDecoder(io.LimitReader(f, maxManifestSize)).Decode(&img); err != nil {
		return nil, fmt.Errorf("config %s: %w", desc.Digest, err)
	}
	return &img, nil
}

// serveObjects streams the requested file objects, each framed as
//
//	enc(1) sha256(32) size(8, BE) length(8, BE) payload(length)
//
// after ObjectsMagic, then FrameEnd and the count of frames (8, BE). Every
// object must belong to one of the named layers, each referenced by the
// repository. The response stops early (before FrameEnd's count would
// cover everything) once MaxResponseBytes is exceeded: the client re-posts
// what it still lacks.
func (s *Server) serveObjects(w http.ResponseWriter, r *http.Request, rc *reqCtx) error {
	ctx := r.Context()
	limit := int64(64<<10) + int64(s.cfg.MaxObjectsPerRequest+maxLayersPerRequest)*80
	body := http.MaxBytesReader(w, r.Body, limit)
	var req ObjectsRequest
	if err := json.NewDecoder(body).Decode(&req); err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return newErr(http.StatusRequestEntityTooLarge, codeSizeInvalid, fmt.Sprintf("request body over %d bytes", limit), nil)
		}
		return newErr(http.StatusBadRequest, codeUnsupported, "objects request is not valid JSON", err)
	}
	if len(req.Objects) > s.cfg.MaxObjectsPerRequest || len(req.Layers) > maxLayersPerRequest {
		return newErr(http.StatusRequestEntityTooLarge, codeSizeInvalid,
			fmt.Sprintf("at most %d objects and %d layers per request", s.cfg.MaxObjectsPerRequest, maxLayersPerRequest), nil)
	}
	if len(req.Layers) == 0 {
		return newErr(http.StatusBadRequest, codeUnsupported, "objects request names no layers", nil)
	}
	allowed := map[digest.Digest]bool{}
	for _, ld := range req.Layers {
		if err := ld.Validate(); err != nil {
			return newErr(http.StatusBadRequest, codeDigestInvalid, "invalid layer digest", err)
		}
		rec, err := s.authorizedLayer(ctx, rc, ld)
		if err != nil {
			return err
		}
		m, err := s.files.GetLayout(ctx, rec.DiffID)
		if err != nil {
			return fmt.Errorf("layer %s: %w", ld, err)
		}
		for _, o := range m.Objects() {
			allowed[o] = true
		}
	}
	for _, o := range req.Objects {
		if o.Validate() != nil || o.Algorithm() != digest.SHA256 {
			return newErr(http.StatusBadRequest, codeDigestInvalid, "objects are named by sha256 digests", nil)
		}
		if !allowed[o] {
			return newErr(http.StatusNotFound, codeBlobUnknown, fmt.Sprintf("object %s is not in the named layers of %s", o, rc.name), nil)
		}
	}
	w.Header().Set("Content-Type", MediaTypeObjects)
	w.WriteHeader(http.StatusOK)
	bw := bufio.NewWriterSize(w, 256<<10)
	cw := &byteCounter{w: bw}
	if _, err := io.WriteString(cw, ObjectsMagic); err != nil {
		return nil
	}
	open, stop := s.storedOpener(ctx, req.Objects)
	defer stop()
	var sent uint64
	for _, o := range req.Objects {
		if cw.n > int64(s.cfg.MaxResponseBytes) {
			break
		}
		if err := s.writeFrame(cw, o, open); err != nil {
			// Headers are sent: cut the stream, the client notices the missing end.
			log.G(ctx).WithError(err).WithField("object", o).Warn("objects stream aborted")
			s.m.servedBytes.WithLabelValues("dedup_objects").Add(float64(cw.n))
			return nil
		}
		sent++
	}
	var end [9]byte
	end[0] = FrameEnd
	binary.BigEndian.PutUint64(end[1:], sent)
	_, _ = cw.Write(end[:])
	_ = bw.Flush()
	s.m.servedBytes.WithLabelValues("dedup_objects").Add(float64(cw.n))
	return nil
}

type byteCounter struct {
	w io.Writer
	n int64
}

func (c *byteCounter) Write(b []byte) (int, error) {
	n, err := c.w.Write(b)
	c.n += int64(n)
	return n, err
}

// writeFrame sends one object; an object stored compressed goes out as its
// stored zstd frame, unrecompressed.
func (s *Server) writeFrame(w io.Writer, o digest.Digest, open storedOpener) error {
	rc, size, n, compressed, err := open(o)
	if err != nil {
		return err
	}
	defer rc.Close()
	enc := FrameRaw
	if compressed {
		enc = FrameZstd
	}
	var hdr [49]byte
	hdr[0] = enc
	raw, err := hexDigest(o)
	if err != nil {
		return err
	}
	copy(hdr[1:33], raw)
	binary.BigEndian.PutUint64(hdr[33:41], uint64(size))
	binary.BigEndian.PutUint64(hdr[41:49], uint64(n))
	if _, err := w.Write(hdr[:]); err != nil {
		return err
	}
	c, err := io.Copy(w, io.LimitReader(rc, n))
	if err == nil && c != n {
		err = fmt.Errorf("object %s: %w", o, io.ErrUnexpectedEOF)
	}
	return err
}

var _ = cas.ErrNotFound
var _ = layout.ErrNotFound

// storedOpener opens the objects of a stream in order, fetched ahead when the
// backend is remote (one round trip per object otherwise).
func (s *Server) storedOpener(ctx context.Context, ds []digest.Digest) (storedOpener, func()) {
	if p, ok := s.files.(interface {
		PrefetchStored(context.Context, []digest.Digest) (storedOpener, func())
	}); ok {
		return p.PrefetchStored(ctx, ds)
	}
	return func(d digest.Digest) (io.ReadCloser, int64, int64, bool, error) {
		return s.files.OpenStored(ctx, d)
	}, func() {}
}
