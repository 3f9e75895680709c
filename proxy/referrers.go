package proxy

import (
	"encoding/json"
	"errors"
	"net/http"
	"strconv"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// getReferrers serves GET /v2/<name>/referrers/<digest>: the upstream's
// referrers (an empty index when it has none), remembered for when the
// upstream is down; ?artifactType= filters.
func (s *Server) getReferrers(w http.ResponseWriter, r *http.Request, rc *reqCtx, d digest.Digest) error {
	ctx := r.Context()
	key := rc.repo + "/_referrers/" + digestKey(d)
	descs, err := rc.up.referrers(ctx, rc.auth, rc.name, d)
	stale := false
	if err != nil {
		s.m.upstreamErrors.WithLabelValues("referrers").Inc()
		if !errors.Is(err, errUpstreamDown) || rc.authKey != "" {
			return err
		}
		if gerr := s.getJSON(ctx, key, &descs); gerr != nil && !isNotFound(gerr) {
			return gerr
		}
		stale = true
		log.G(ctx).WithError(err).WithField("repo", rc.name).Warn("upstream unavailable: serving stored referrers")
	} else if len(descs) > 0 {
		if err := s.putJSON(ctx, key, descs); err != nil {
			return err
		}
	}
	h := w.Header()
	if at := r.URL.Query().Get("artifactType"); at != "" {
		var kept []ocispec.Descriptor
		for _, d := range descs {
			if d.ArtifactType == at {
				kept = append(kept, d)
			}
		}
		descs = kept
		h.Set("OCI-Filters-Applied", "artifactType")
	}
	if descs == nil {
		descs = []ocispec.Descriptor{}
	}
	idx := ocispec.Index{MediaType: ocispec.MediaTypeImageIndex, Manifests: descs}
	idx.SchemaVersion = 2
	body, err := json.Marshal(idx)
	if err != nil {
		return err
	}
	h.Set("Content-Type", ocispec.MediaTypeImageIndex)
	h.Set("Content-Length", strconv.Itoa(len(body)))
	if stale {
		h.Set("Warning", `110 - "Response is Stale"`)
		h.Set("X-Dupproxy-Stale", "true")
	}
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodGet {
		_, _ = w.Write(body)
	}
	return nil
}
