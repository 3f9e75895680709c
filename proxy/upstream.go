package proxy

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/remotes"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	remoteerrors "github.com/containerd/containerd/v2/core/remotes/errors"
	"github.com/containerd/containerd/v2/pkg/reference"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// maxManifestSize bounds manifests, configs and indexes read into memory.
const maxManifestSize = 4 << 20

// upstream is one registry behind the proxy. Requests go through
// containerd's remotes/docker resolver and fetcher, which do the anonymous
// token flow and basic auth.
type upstream struct {
	id          string // meta key component: "default" or the ns host
	url         *url.URL
	cfg         UpstreamConfig
	client      *http.Client
	auth        docker.Authorizer // proxy's own credentials
	passthrough bool

	mu      sync.Mutex
	clients map[string]*clientAuth // by hash of the client's Authorization
}

type clientAuth struct {
	auth    docker.Authorizer
	expires time.Time
	// pulls: repositories this client was seen to be able to pull, until.
	pulls map[string]time.Time
}

func newUpstream(id string, cfg UpstreamConfig) (*upstream, error) {
	u, err := url.Parse(cfg.URL)
	if err != nil {
		return nil, fmt.Errorf("upstream %s: %w", id, err)
	}
	tr := docker.DefaultHTTPTransport(nil)
	// The blob bytes must reach us exactly as the registry stores them.
	tr.DisableCompression = true
	tr.ResponseHeaderTimeout = 60 * time.Second
	tr.DialContext = (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext
	client := &http.Client{Transport: tr}
	up := &upstream{id: id, url: u, cfg: cfg, client: client, passthrough: cfg.AuthPassthrough, clients: map[string]*clientAuth{}}
	up.auth = up.newAuthorizer(cfg.Username, cfg.Password)
	return up, nil
}

func (u *upstream) newAuthorizer(user, pass string) docker.Authorizer {
	return docker.NewDockerAuthorizer(
		docker.WithAuthClient(u.client),
		docker.WithAuthCreds(func(string) (string, string, error) { return user, pass, nil }),
	)
}

// authorizerFor picks the credentials for a request: in passthrough mode the
// client's own Basic credentials, otherwise the proxy's.
func (u *upstream) authorizerFor(r *http.Request) (docker.Authorizer, string, error) {
	if !u.passthrough {
		return u.auth, "", nil
	}
	user, pass, ok := r.BasicAuth()
	if !ok {
		return nil, "", newErr(http.StatusUnauthorized, codeUnauthorized, "credentials for the upstream registry are required", nil)
	}
	sum := sha256.Sum256([]byte(r.Header.Get("Authorization")))
	key := hex.EncodeToString(sum[:])
	u.mu.Lock()
	defer u.mu.Unlock()
	ca := u.clients[key]
	if ca == nil || time.Now().After(ca.expires) {
		if len(u.clients) > 1024 {
			u.clients = map[string]*clientAuth{}
		}
		ca = &clientAuth{auth: u.newAuthorizer(user, pass), expires: time.Now().Add(10 * time.Minute), pulls: map[string]time.Time{}}
		u.clients[key] = ca
	}
	return ca.auth, key, nil
}

func (u *upstream) hosts(a docker.Authorizer) docker.RegistryHosts {
	return func(string) ([]docker.RegistryHost, error) {
		return []docker.RegistryHost{{
			Client:       u.client,
			Authorizer:   a,
			Host:         u.url.Host,
			Scheme:       u.url.Scheme,
			Path:         strings.TrimSuffix(u.url.Path, "/") + "/v2",
			Capabilities: docker.HostCapabilityPull | docker.HostCapabilityResolve | docker.HostCapabilityReferrers,
		}}, nil
	}
}

func (u *upstream) resolver(a docker.Authorizer) remotes.Resolver {
	return docker.NewResolver(docker.ResolverOptions{Hosts: u.hosts(a)})
}

func (u *upstream) ref(name, tagOrDigest string) string {
	if strings.Contains(tagOrDigest, ":") {
		return u.url.Host + "/" + name + "@" + tagOrDigest
	}
	return u.url.Host + "/" + name + ":" + tagOrDigest
}

// errUpstreamDown marks failures that are not an answer of the upstream
// about the content (network, 5xx): stale content may be served then.
var errUpstreamDown = errors.New("upstream unavailable")

// classify turns a containerd remotes error into an apiError.
func classify(err error, what string, notFoundCode string) error {
	if err == nil {
		return nil
	}
	if errdefs.IsNotFound(err) {
		return newErr(http.StatusNotFound, notFoundCode, what+" unknown to upstream", err)
	}
	var us remoteerrors.ErrUnexpectedStatus
	if errors.As(err, &us) {
		switch {
		case us.StatusCode == http.StatusNotFound:
			return newErr(http.StatusNotFound, notFoundCode, what+" unknown to upstream", err)
		case us.StatusCode == http.StatusUnauthorized:
			return newErr(http.StatusUnauthorized, codeUnauthorized, "upstream refused the credentials for "+what, err)
		case us.StatusCode == http.StatusForbidden:
			return newErr(http.StatusForbidden, codeDenied, "upstream denied access to "+what, err)
		case us.StatusCode == http.StatusTooManyRequests:
			return newErr(http.StatusTooManyRequests, codeTooManyRequests, "upstream rate limit", err)
		}
	}
	if errdefs.IsUnauthorized(err) {
		return newErr(http.StatusUnauthorized, codeUnauthorized, "upstream refused the credentials for "+what, err)
	}
	if errdefs.IsPermissionDenied(err) {
		return newErr(http.StatusForbidden, codeDenied, "upstream denied access to "+what, err)
	}
	return newErr(http.StatusBadGateway, codeUnknown, "fetching "+what+" from upstream", fmt.Errorf("%w: %w", errUpstreamDown, err))
}

// resolve asks the upstream which manifest a tag or digest names (one HEAD).
func (u *upstream) resolve(ctx context.Context, a docker.Authorizer, name, ref string) (ocispec.Descriptor, error) {
	_, desc, err := u.resolver(a).Resolve(ctx, u.ref(name, ref))
	if err != nil {
		return desc, classify(err, "manifest "+name+":"+ref, codeManifestUnknown)
	}
	return desc, nil
}

// fetchManifest reads a manifest named by desc and verifies it.
func (u *upstream) fetchManifest(ctx context.Context, a docker.Authorizer, name string, desc ocispec.Descriptor) ([]byte, error) {
	if desc.Size > maxManifestSize {
		return nil, newErr(http.StatusBadGateway, codeManifestInvalid, fmt.Sprintf("upstream manifest %s is %d bytes, over the %d limit", desc.Digest, desc.Size, maxManifestSize), nil)
	}
	f, err := u.resolver(a).Fetcher(ctx, u.ref(name, desc.Digest.String()))
	if err != nil {
		return nil, classify(err, "manifest "+desc.Digest.String(), codeManifestUnknown)
	}
	rc, err := f.Fetch(ctx, desc)
	if err != nil {
		return nil, classify(err, "manifest "+desc.Digest.String(), codeManifestUnknown)
	}
	defer rc.Close()
	b, err := io.ReadAll(io.LimitReader(rc, maxManifestSize+1))
	if err != nil {
		return nil, classify(err, "manifest "+desc.Digest.String(), codeManifestUnknown)
	}
	if int64(len(b)) != desc.Size || desc.Digest.Algorithm().FromBytes(b) != desc.Digest {
		return nil, newErr(http.StatusBadGateway, codeManifestInvalid,
			fmt.Sprintf("upstream sent a manifest that does not match %s (%d bytes, expected %d)", desc.Digest, len(b), desc.Size), errDigestMismatch)
	}
	return b, nil
}

// openBlob starts a blob download; size < 0 when unknown (then a HEAD asks).
func (u *upstream) openBlob(ctx context.Context, a docker.Authorizer, name string, d digest.Digest, size int64) (io.ReadCloser, int64, error) {
	f, err := u.resolver(a).Fetcher(ctx, u.ref(name, d.String()))
	if err != nil {
		return nil, 0, classify(err, "blob "+d.String(), codeBlobUnknown)
	}
	if size >= 0 {
		rc, err := f.Fetch(ctx, ocispec.Descriptor{MediaType: "application/octet-stream", Digest: d, Size: size})
		if err != nil {
			return nil, 0, classify(err, "blob "+d.String(), codeBlobUnknown)
		}
		return rc, size, nil
	}
	fb, ok := f.(remotes.FetcherByDigest)
	if !ok {
		return nil, 0, fmt.Errorf("containerd fetcher cannot fetch by digest")
	}
	rc, desc, err := fb.FetchByDigest(ctx, d)
	if err != nil {
		return nil, 0, classify(err, "blob "+d.String(), codeBlobUnknown)
	}
	return rc, desc.Size, nil
}

// headBlob checks that the upstream has d in name (authorization of a blob
// already stored for another repository).
func (u *upstream) headBlob(ctx context.Context, a docker.Authorizer, name string, d digest.Digest) (int64, error) {
	resp, err := u.do(ctx, a, name, http.MethodHead, "/"+name+"/blobs/"+d.String(), nil)
	if err != nil {
		return 0, classify(err, "blob "+d.String(), codeBlobUnknown)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, classify(remoteerrors.NewUnexpectedStatusErr(resp), "blob "+d.String(), codeBlobUnknown)
	}
	return resp.ContentLength, nil
}

// do sends one request to the upstream's /v2 API with containerd's
// authorizer (used where the resolver has no method: tags, HEAD blob).
func (u *upstream) do(ctx context.Context, a docker.Authorizer, name, method, path string, q url.Values) (*http.Response, error) {
	spec, err := reference.Parse(u.url.Host + "/" + name)
	if err != nil {
		return nil, err
	}
	ctx, err = docker.ContextWithRepositoryScope(ctx, spec, false)
	if err != nil {
		return nil, err
	}
	target := *u.url
	target.Path = strings.TrimSuffix(u.url.Path, "/") + "/v2" + path
	target.RawQuery = q.Encode()
	var resp *http.Response
	for attempt := 0; attempt < 2; attempt++ {
		req, err := http.NewRequestWithContext(ctx, method, target.String(), nil)
		if err != nil {
			return nil, err
		}
		if err := a.Authorize(ctx, req); err != nil {
			return nil, err
		}
		resp, err = u.client.Do(req)
		if err != nil {
			return nil, err
		}
		if resp.StatusCode != http.StatusUnauthorized || attempt == 1 {
			break
		}
		resp.Body.Close()
		if err := a.AddResponses(ctx, []*http.Response{resp}); err != nil {
			return nil, err
		}
	}
	return resp, nil
}

// tags lists every tag of name, following the upstream's pagination.
func (u *upstream) tags(ctx context.Context, a docker.Authorizer, name string) ([]string, error) {
	var all []string
	q := url.Values{}
	for page := 0; page < 100; page++ {
		resp, err := u.do(ctx, a, name, http.MethodGet, "/"+name+"/tags/list", q)
		if err != nil {
			return nil, classify(err, "tags of "+name, codeNameUnknown)
		}
		if resp.StatusCode != http.StatusOK {
			resp.Body.Close()
			return nil, classify(remoteerrors.NewUnexpectedStatusErr(resp), "tags of "+name, codeNameUnknown)
		}
		var tl struct {
			Tags []string `json:"tags"`
		}
		err = json.NewDecoder(io.LimitReader(resp.Body, maxManifestSize)).Decode(&tl)
		resp.Body.Close()
		if err != nil {
			return nil, newErr(http.StatusBadGateway, codeUnknown, "upstream tag list is not valid JSON", err)
		}
		all = append(all, tl.Tags...)
		next := resp.Header.Get("Link")
		if next == "" || len(tl.Tags) == 0 {
			break
		}
		i, j := strings.Index(next, "<"), strings.Index(next, ">")
		if i < 0 || j < i {
			break
		}
		nu, err := url.Parse(next[i+1 : j])
		if err != nil {
			break
		}
		q = nu.Query()
	}
	return all, nil
}

// referrers returns the upstream's referrers of d (empty when none).
func (u *upstream) referrers(ctx context.Context, a docker.Authorizer, name string, d digest.Digest) ([]ocispec.Descriptor, error) {
	f, err := u.resolver(a).Fetcher(ctx, u.ref(name, d.String()))
	if err != nil {
		return nil, classify(err, "referrers of "+d.String(), codeManifestUnknown)
	}
	rf, ok := f.(remotes.ReferrersFetcher)
	if !ok {
		return nil, fmt.Errorf("containerd fetcher cannot fetch referrers")
	}
	descs, err := rf.FetchReferrers(ctx, d)
	if err != nil {
		return nil, classify(err, "referrers of "+d.String(), codeManifestUnknown)
	}
	return descs, nil
}
