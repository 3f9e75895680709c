package proxy

import (
	"net/http"
	"regexp"
	"strings"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
)

var (
	reManifest  = regexp.MustCompile(`^/v2/(.+)/manifests/([^/]+)$`)
	reUpload    = regexp.MustCompile(`^/v2/(.+)/blobs/uploads(/.*)?$`)
	reBlob      = regexp.MustCompile(`^/v2/(.+)/blobs/([^/]+)$`)
	reTags      = regexp.MustCompile(`^/v2/(.+)/tags/list$`)
	reReferrers = regexp.MustCompile(`^/v2/(.+)/referrers/([^/]+)$`)
	reDedupL    = regexp.MustCompile(`^/dedup/v1/(.+)/layers/([^/]+)/manifest$`)
	reDedupD    = regexp.MustCompile(`^/dedup/v1/(.+)/diffids/([^/]+)/manifest$`)
	reDedupO    = regexp.MustCompile(`^/dedup/v1/(.+)/objects$`)
)

// reqCtx is what every repository route needs: the upstream, the
// repository and the credentials used upstream for this client.
type reqCtx struct {
	up      *upstream
	name    string // repository name as in the URL
	repo    string // meta key prefix of the repository
	auth    docker.Authorizer
	authKey string // non-empty in passthrough mode
}

// ServeHTTP routes the OCI distribution API (pull side) and the dedup API.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	ctx := log.WithLogger(r.Context(), log.G(s.ctx).WithField("method", r.Method).WithField("path", r.URL.Path))
	r = r.WithContext(ctx)
	p := r.URL.Path
	read := r.Method == http.MethodGet || r.Method == http.MethodHead
	switch {
	case p == "/v2" || p == "/v2/":
		if !read {
			writeError(w, r, errUnsupported)
			return
		}
		w.Header().Set("Docker-Distribution-API-Version", "registry/2.0")
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", "2")
		w.WriteHeader(http.StatusOK)
		if r.Method == http.MethodGet {
			_, _ = w.Write([]byte("{}"))
		}
	case strings.HasPrefix(p, "/v2/"):
		s.serveV2(w, r, read)
	case strings.HasPrefix(p, "/dedup/v1/"):
		s.serveDedup(w, r)
	default:
		writeError(w, r, newErr(http.StatusNotFound, codeNameUnknown, "no such endpoint", nil))
	}
}

func (s *Server) serveV2(w http.ResponseWriter, r *http.Request, read bool) {
	w.Header().Set("Docker-Distribution-API-Version", "registry/2.0")
	p := r.URL.Path
	if reUpload.MatchString(p) || !read {
		writeError(w, r, errUnsupported)
		return
	}
	route := func(re *regexp.Regexp) []string { return re.FindStringSubmatch(p) }
	if m := route(reManifest); m != nil {
		s.withRepo(w, r, m[1], func(rc *reqCtx) error { return s.getManifest(w, r, rc, m[2]) })
		return
	}
	if m := route(reBlob); m != nil {
		s.withRepo(w, r, m[1], func(rc *reqCtx) error {
			d, err := parseDigest(m[2])
			if err != nil {
				return err
			}
			return s.getBlob(w, r, rc, d)
		})
		return
	}
	if m := route(reTags); m != nil {
		s.withRepo(w, r, m[1], func(rc *reqCtx) error { return s.getTags(w, r, rc) })
		return
	}
	if m := route(reReferrers); m != nil {
		s.withRepo(w, r, m[1], func(rc *reqCtx) error {
			d, err := parseDigest(m[2])
			if err != nil {
				return err
			}
			return s.getReferrers(w, r, rc, d)
		})
		return
	}
	writeError(w, r, newErr(http.StatusNotFound, codeNameUnknown, "no such endpoint", nil))
}

// withRepo validates the repository name, picks the upstream from ?ns= and
// the credentials, and runs fn, answering its error.
func (s *Server) withRepo(w http.ResponseWriter, r *http.Request, name string, fn func(*reqCtx) error) {
	if err := func() error {
		rc, err := s.newReqCtx(r, name)
		if err != nil {
			return err
		}
		return fn(rc)
	}(); err != nil {
		writeError(w, r, err)
	}
}

func (s *Server) newReqCtx(r *http.Request, name string) (*reqCtx, error) {
	if !validName(name) {
		return nil, errNameInvalid
	}
	up, err := s.upstreamFor(r.URL.Query().Get("ns"))
	if err != nil {
		return nil, err
	}
	a, key, err := up.authorizerFor(r)
	if err != nil {
		return nil, err
	}
	return &reqCtx{up: up, name: name, repo: repoKey(up.id, name), auth: a, authKey: key}, nil
}

func parseDigest(v string) (digest.Digest, error) {
	d, err := digest.Parse(v)
	if err != nil {
		return "", newErr(http.StatusBadRequest, codeDigestInvalid, "invalid digest "+v, err)
	}
	return d, nil
}
