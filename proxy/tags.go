package proxy

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"path"
	"sort"
	"strconv"
	"strings"

	"github.com/containerd/log"
)

// getTags serves GET /v2/<name>/tags/list with the spec's n/last pagination.
// The upstream's list is authoritative; when it is down, the tags this proxy
// has resolved are listed (stale).
func (s *Server) getTags(w http.ResponseWriter, r *http.Request, rc *reqCtx) error {
	ctx := r.Context()
	tags, err := rc.up.tags(ctx, rc.auth, rc.name)
	stale := false
	if err != nil {
		s.m.upstreamErrors.WithLabelValues("tags").Inc()
		if !errors.Is(err, errUpstreamDown) || !s.cfg.serveStale() || rc.authKey != "" {
			return err
		}
		keys, lerr := s.meta.List(ctx, rc.repo+"/_tags")
		if lerr != nil || len(keys) == 0 {
			return err
		}
		for _, k := range keys {
			tags = append(tags, path.Base(k))
		}
		stale = true
		log.G(ctx).WithError(err).WithField("repo", rc.name).Warn("upstream unavailable: serving stale tag list")
	}
	sort.Strings(tags)
	q := r.URL.Query()
	if last := q.Get("last"); last != "" {
		i := sort.SearchStrings(tags, last)
		if i < len(tags) && tags[i] == last {
			i++
		}
		tags = tags[i:]
	}
	next := ""
	if nv := q.Get("n"); nv != "" {
		n, err := strconv.Atoi(nv)
		if err != nil || n < 0 {
			return newErr(http.StatusBadRequest, codeUnsupported, fmt.Sprintf("invalid n=%q", nv), nil)
		}
		if n < len(tags) {
			tags = tags[:n]
			if n > 0 {
				v := url.Values{"n": {nv}, "last": {tags[n-1]}}
				if ns := q.Get("ns"); ns != "" {
					v.Set("ns", ns)
				}
				next = fmt.Sprintf(`</v2/%s/tags/list?%s>; rel="next"`, rc.name, v.Encode())
			}
		}
	}
	if tags == nil {
		tags = []string{}
	}
	body, _ := json.Marshal(map[string]any{"name": rc.name, "tags": tags})
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(body)))
	if next != "" {
		h.Set("Link", next)
	}
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

var _ = strings.TrimSpace
