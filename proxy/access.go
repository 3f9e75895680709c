package proxy

import (
	"context"
	"net/http"
	"time"

	"github.com/opencontainers/go-digest"
)

// pullCheckTTL is how long an upstream's "yes, this client may pull this
// repository" is trusted.
const pullCheckTTL = time.Minute

// checkAccess, in passthrough mode, asks the upstream (with the client's own
// credentials) whether the client can read d in the repository before
// anything is served from the shared store. Otherwise it is a no-op: the
// proxy's credentials were used when the content was linked to the repository.
func (s *Server) checkAccess(ctx context.Context, rc *reqCtx, kind string, d digest.Digest) error {
	if rc.authKey == "" {
		return nil
	}
	u := rc.up
	u.mu.Lock()
	ca := u.clients[rc.authKey]
	ok := ca != nil && time.Now().Before(ca.pulls[rc.name])
	u.mu.Unlock()
	if ok {
		return nil
	}
	resp, err := u.do(ctx, rc.auth, rc.name, http.MethodHead, "/"+rc.name+"/"+kind+"/"+d.String(), nil)
	if err != nil {
		s.m.upstreamErrors.WithLabelValues("access").Inc()
		return classify(err, rc.name, codeNameUnknown)
	}
	resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusOK:
	case http.StatusUnauthorized:
		return newErr(http.StatusUnauthorized, codeUnauthorized, "upstream refused the client's credentials for "+rc.name, nil)
	case http.StatusNotFound:
		return newErr(http.StatusNotFound, codeNameUnknown, "upstream has no "+d.String()+" in "+rc.name+" for this client", nil)
	default:
		return newErr(http.StatusForbidden, codeDenied, "upstream denied "+rc.name+" to this client: "+resp.Status, nil)
	}
	u.mu.Lock()
	if ca = u.clients[rc.authKey]; ca != nil {
		ca.pulls[rc.name] = time.Now().Add(pullCheckTTL)
	}
	u.mu.Unlock()
	return nil
}
