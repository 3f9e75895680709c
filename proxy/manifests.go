package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// getManifest serves GET/HEAD /v2/<name>/manifests/<ref> with the exact bytes
// fetched from the upstream.
func (s *Server) getManifest(w http.ResponseWriter, r *http.Request, rc *reqCtx, ref string) error {
	ctx := r.Context()
	var (
		link  *manifestLink
		stale bool
		err   error
	)
	if strings.Contains(ref, ":") {
		d, err := parseDigest(ref)
		if err != nil {
			return err
		}
		link, err = s.manifestByDigest(ctx, rc, d)
		if err != nil {
			return s.offline(err, codeManifestUnknown)
		}
	} else {
		if !tagRe.MatchString(ref) {
			return newErr(http.StatusNotFound, codeManifestUnknown, "invalid tag "+ref, nil)
		}
		link, stale, err = s.manifestByTag(ctx, rc, ref)
		if err != nil {
			return s.offline(err, codeManifestUnknown)
		}
	}
	f, size, err := s.blobs.Open(ctx, link.Digest)
	if err != nil {
		return fmt.Errorf("opening stored manifest %s: %w", link.Digest, err)
	}
	defer f.Close()
	h := w.Header()
	h.Set("Content-Type", link.MediaType)
	h.Set("Docker-Content-Digest", link.Digest.String())
	h.Set("Content-Length", strconv.FormatInt(size, 10))
	h.Set("Etag", `"`+link.Digest.String()+`"`)
	if stale {
		h.Set("Warning", `110 - "Response is Stale"`)
		h.Set("X-Dupproxy-Stale", "true")
	}
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodHead {
		return nil
	}
	n, _ := io.Copy(w, f)
	s.m.servedBytes.WithLabelValues("manifest").Add(float64(n))
	s.touchManifest(ctx, rc.repo, link.Digest)
	s.predict(rc, link)
	return nil
}

// manifestByDigest: a manifest this repository already served needs no
// upstream round trip (content addressed); anything else is fetched through
// the repository, which also proves the repository has it.
func (s *Server) manifestByDigest(ctx context.Context, rc *reqCtx, d digest.Digest) (*manifestLink, error) {
	if l, err := s.manifestLinkOf(ctx, rc.repo, d); err == nil {
		if err := s.checkAccess(ctx, rc, "manifests", d); err != nil {
			return nil, err
		}
		return l, nil
	}
	desc, err := rc.up.resolve(ctx, rc.auth, rc.name, d.String())
	if err != nil {
		s.m.upstreamErrors.WithLabelValues("resolve").Inc()
		return nil, err
	}
	if desc.Digest != d {
		return nil, newErr(http.StatusBadGateway, codeManifestInvalid, fmt.Sprintf("upstream answered %s for %s", desc.Digest, d), errDigestMismatch)
	}
	return s.fetchManifest(ctx, rc, desc)
}

// manifestByTag resolves the tag upstream (one HEAD) unless it was resolved
// within TagTTL; when the upstream is down the last known manifest is served
// stale if configured.
func (s *Server) manifestByTag(ctx context.Context, rc *reqCtx, tag string) (*manifestLink, bool, error) {
	key := rc.repo + "/_tags/" + tag
	var tr tagRecord
	haveTag := s.getJSON(ctx, key, &tr) == nil
	if haveTag && s.cfg.TagTTL > 0 && time.Since(tr.Fetched) < time.Duration(s.cfg.TagTTL) && rc.authKey == "" {
		if l, err := s.manifestLinkOf(ctx, rc.repo, tr.Digest); err == nil {
			return l, false, nil
		}
	}
	desc, err := rc.up.resolve(ctx, rc.auth, rc.name, tag)
	if err != nil {
		s.m.upstreamErrors.WithLabelValues("resolve").Inc()
		// Stale answers only where no credential check is needed (in
		// passthrough mode the upstream must vouch for the client).
		if errors.Is(err, errUpstreamDown) && haveTag && s.cfg.serveStale() && rc.authKey == "" {
			if l, lerr := s.manifestLinkOf(ctx, rc.repo, tr.Digest); lerr == nil {
				log.G(ctx).WithError(err).WithField("repo", rc.name).WithField("tag", tag).
					WithField("digest", tr.Digest).WithField("resolved", tr.Fetched).Warn("upstream unavailable: serving stale manifest")
				return l, true, nil
			}
		}
		return nil, false, err
	}
	l, err := s.manifestLinkOf(ctx, rc.repo, desc.Digest)
	if err != nil {
		if l, err = s.fetchManifest(ctx, rc, desc); err != nil {
			return nil, false, err
		}
	}
	if err := s.putJSON(ctx, key, tagRecord{Digest: l.Digest, MediaType: l.MediaType, Size: l.Size, Fetched: time.Now()}); err != nil {
		return nil, false, err
	}
	return l, false, nil
}

// manifestFields is what dupproxy reads from any manifest or index.
type manifestFields struct {
	SchemaVersion int                  `json:"schemaVersion"`
	MediaType     string               `json:"mediaType"`
	Config        *ocispec.Descriptor  `json:"config"`
	Layers        []ocispec.Descriptor `json:"layers"`
	Manifests     []ocispec.Descriptor `json:"manifests"`
	Subject       *ocispec.Descriptor  `json:"subject"`
}

// fetchManifest downloads, verifies, parses, stores and links a manifest.
func (s *Server) fetchManifest(ctx context.Context, rc *reqCtx, desc ocispec.Descriptor) (*manifestLink, error) {
	b, err := rc.up.fetchManifest(ctx, rc.auth, rc.name, desc)
	if err != nil {
		s.m.upstreamErrors.WithLabelValues("manifest").Inc()
		return nil, err
	}
	s.m.upstreamBytes.WithLabelValues("manifest").Add(float64(len(b)))
	mf, err := parseManifest(b)
	if err != nil {
		return nil, newErr(http.StatusBadGateway, codeManifestInvalid, "upstream manifest "+desc.Digest.String()+" rejected", err)
	}
	mt := desc.MediaType
	if mt == "" || mt == "application/octet-stream" {
		mt = mf.MediaType
	}
	if mt == "" {
		mt = ocispec.MediaTypeImageManifest
		if mf.Manifests != nil {
			mt = ocispec.MediaTypeImageIndex
		}
	}
	// Held until the link that keeps the blob exists: a GC sweep (on any
	// replica) in between would see an unreferenced blob.
	release, err := s.files.Lease(ctx)
	if err != nil {
		return nil, fmt.Errorf("storing manifest: %w", err)
	}
	defer release()
	if err := s.blobs.Put(ctx, desc.Digest, int64(len(b)), strings.NewReader(string(b))); err != nil {
		return nil, fmt.Errorf("storing manifest: %w", err)
	}
	now := time.Now()
	l := &manifestLink{Digest: desc.Digest, MediaType: mt, Size: int64(len(b)), Fetched: now, LastAccess: now,
		Config: mf.Config, Layers: mf.Layers, Manifests: mf.Manifests, Subject: mf.Subject}
	if err := s.linkManifest(ctx, rc.repo, l); err != nil {
		return nil, err
	}
	log.G(ctx).WithField("repo", rc.name).WithField("digest", desc.Digest).WithField("layers", len(mf.Layers)).Debug("manifest fetched")
	return l, nil
}

// parseManifest checks that b is a manifest dupproxy can reason about: a JSON
// object whose descriptors have valid digests and sizes.
func parseManifest(b []byte) (*manifestFields, error) {
	var mf manifestFields
	if err := json.Unmarshal(b, &mf); err != nil {
		return nil, fmt.Errorf("not a JSON manifest: %w", err)
	}
	if mf.SchemaVersion != 2 {
		return nil, fmt.Errorf("unsupported schemaVersion %d", mf.SchemaVersion)
	}
	check := func(d ocispec.Descriptor) error {
		if err := d.Digest.Validate(); err != nil {
			return fmt.Errorf("descriptor digest %q: %w", d.Digest, err)
		}
		if d.Size < 0 {
			return fmt.Errorf("descriptor %s has negative size", d.Digest)
		}
		return nil
	}
	if mf.Config != nil {
		if err := check(*mf.Config); err != nil {
			return nil, err
		}
	}
	if mf.Subject != nil {
		if err := check(*mf.Subject); err != nil {
			return nil, err
		}
	}
	for _, d := range append(append([]ocispec.Descriptor{}, mf.Layers...), mf.Manifests...) {
		if err := check(d); err != nil {
			return nil, err
		}
	}
	return &mf, nil
}

// offline: in stale mode, what is neither stored nor reachable upstream is
// unknown (404) rather than a gateway error, as a registry without the
// upstream would answer.
func (s *Server) offline(err error, code string) error {
	if s.cfg.serveStale() && errors.Is(err, errUpstreamDown) {
		return newErr(http.StatusNotFound, code, "not stored by the proxy and the upstream is unavailable", err)
	}
	return err
}
