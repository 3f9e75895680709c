// Package offload is dupsnap's middle tier (dedup offloading): a layer that
// containerd is about to unpack is pulled from dupproxy as its file manifest
// plus only the file objects the node CAS lacks. The uncompressed tar is
// rebuilt from the manifest and the objects and must hash to the layer's
// diffID before anything becomes visible in the node's stores; on any
// failure nothing is kept and the caller unpacks the layer the ordinary way.
package offload

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	dconfig "github.com/containerd/containerd/v2/core/remotes/docker/config"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
)

// Config selects the dupproxy endpoint(s) and bounds the work per layer.
// The zero value disables offloading.
type Config struct {
	// Default is the dupproxy URL used for registries without an entry in
	// Endpoints or HostsDir (e.g. "http://dupproxy:5000"); empty: none.
	Default string
	// Endpoints maps a registry host ("docker.io", "localhost:5000") to
	// the dupproxy URL that mirrors it.
	Endpoints map[string]Endpoint
	// HostsDir reuses containerd's hosts.toml directory (e.g.
	// /etc/containerd/certs.d): the first pull-capable mirror listed for a
	// registry is taken to be its dupproxy.
	HostsDir string
	// Timeout bounds one layer (manifest, objects, verification); past it
	// the layer is unpacked normally. Default 2m.
	Timeout time.Duration
	// ConnectTimeout bounds dialing and waiting for response headers, so an
	// unreachable dupproxy costs little. Default 3s.
	ConnectTimeout time.Duration
	// Parallel requests per layer (default 4) and objects per request (default 512).
	Parallel, BatchSize int
	// ContainerdAddress and ContainerdNamespace let dupsnap find the
	// repository of a layer when the pull passes no cri.image-ref label
	// (nerdctl, plain client pulls): the image config listing the layer's
	// diffID is looked up in containerd's content store and its
	// containerd.io/distribution.source.* labels name the repository.
	// Empty address: such layers are unpacked normally.
	ContainerdAddress   string
	ContainerdNamespace string // used when the request carries none; default "default"
	// StagingDir holds verified objects until their layer is verified
	// (default: <cas root>/../offload-staging).
	StagingDir string
}

// Endpoint is one dupproxy.
type Endpoint struct {
	URL string `toml:"url"`
	// Username/Password are sent as Basic credentials (dupproxy in
	// auth_passthrough mode checks them against the upstream).
	Username string `toml:"username"`
	Password string `toml:"password"`
}

// Enabled reports whether any endpoint source is configured.
func (c Config) Enabled() bool {
	return c.Default != "" || len(c.Endpoints) > 0 || c.HostsDir != ""
}

func (c Config) withDefaults() Config {
	if c.Timeout <= 0 {
		c.Timeout = 2 * time.Minute
	}
	if c.ConnectTimeout <= 0 {
		c.ConnectTimeout = 3 * time.Second
	}
	if c.Parallel <= 0 {
		c.Parallel = 4
	}
	if c.BatchSize <= 0 {
		c.BatchSize = 512
	}
	if c.ContainerdNamespace == "" {
		c.ContainerdNamespace = "default"
	}
	return c
}

// target is where to ask for a layer of a registry host.
type target struct {
	url  string
	ns   string // ?ns= (the registry host), empty when dupproxy is the registry itself
	auth string
	http *http.Client
}

func (f *Fetcher) newHTTPClient(base *http.Client) *http.Client {
	tr := &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{Timeout: f.cfg.ConnectTimeout}).DialContext,
		ResponseHeaderTimeout: f.cfg.ConnectTimeout * 10,
		MaxIdleConnsPerHost:   f.cfg.Parallel * 2,
		IdleConnTimeout:       90 * time.Second,
		// Objects come as zstd frames already; never let the transport
		// decompress anything behind the verifier's back.
		DisableCompression: true,
	}
	if base != nil {
		if t, ok := base.Transport.(*http.Transport); ok && t.TLSClientConfig != nil {
			tr.TLSClientConfig = t.TLSClientConfig.Clone()
		}
	}
	return &http.Client{Transport: tr}
}

// endpointFor picks the dupproxy for registry host: explicit entry, then
// hosts.toml mirror, then the default.
func (f *Fetcher) endpointFor(ctx context.Context, host string) (*target, error) {
	if ep, ok := f.lookupEndpoint(host); ok {
		return f.target(ep, host, nil), nil
	}
	if f.hosts != nil {
		rhs, err := f.hosts(host)
		if err != nil {
			log.G(ctx).WithError(err).WithField("host", host).Debug("offload: reading hosts.toml")
		}
		for _, rh := range rhs {
			if rh.Host == host || rh.Capabilities&docker.HostCapabilityPull == 0 {
				continue
			}
			return f.target(Endpoint{URL: rh.Scheme + "://" + rh.Host}, host, rh.Client), nil
		}
	}
	if f.cfg.Default != "" {
		return f.target(Endpoint{URL: f.cfg.Default}, host, nil), nil
	}
	return nil, fmt.Errorf("no dupproxy configured for %s: %w", host, errdefs.ErrNotFound)
}

// lookupEndpoint matches host exactly, or by hostname alone: containerd's
// distribution-source labels carry the hostname without port.
func (f *Fetcher) lookupEndpoint(host string) (Endpoint, bool) {
	if ep, ok := f.cfg.Endpoints[host]; ok {
		return ep, true
	}
	for h, ep := range f.cfg.Endpoints {
		if hostname(h) == host {
			return ep, true
		}
	}
	return Endpoint{}, false
}

func hostname(h string) string {
	if i := strings.LastIndexByte(h, ':'); i > 0 && !strings.Contains(h[i:], "]") {
		return h[:i]
	}
	return h
}

func (f *Fetcher) target(ep Endpoint, host string, base *http.Client) *target {
	t := &target{url: strings.TrimSuffix(ep.URL, "/"), ns: host}
	if u, err := url.Parse(t.url); err == nil && (u.Host == host || u.Hostname() == host) {
		t.ns = "" // the pulled registry is dupproxy itself
	}
	if ep.Username != "" {
		r, _ := http.NewRequest(http.MethodGet, "/", nil)
		r.SetBasicAuth(ep.Username, ep.Password)
		t.auth = r.Header.Get("Authorization")
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	key := t.url
	if base != nil {
		key += "|tls"
	}
	hc, ok := f.clients[key]
	if !ok {
		hc = f.newHTTPClient(base)
		f.clients[key] = hc
	}
	t.http = hc
	return t
}

func hostsFunc(ctx context.Context, dir string) docker.RegistryHosts {
	if dir == "" {
		return nil
	}
	return dconfig.ConfigureHosts(ctx, dconfig.HostOptions{HostDir: dconfig.HostDirFromRoot(dir)})
}
