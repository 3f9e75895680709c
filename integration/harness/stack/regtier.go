package stack

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/dupsnap/dupsnap/integration/harness"
)

// RegTier is the registry side: the upstream registry (distribution v3)
// and dupproxy in front of it, each behind a counting Forwarder so that
// what nodes pull is measured on the wire.
type RegTier struct {
	Dir      string
	Registry *harness.Registry
	RegFwd   *Forwarder // nodes pull "from the plain registry" through this
	ProxyFwd *Forwarder // and from dupproxy through this
	// ProxyErr says why dupproxy is not available (empty when it is).
	ProxyErr   string
	proxy      *harness.Proc
	proxyAddr  string
	ProxyRoot  string
	ProxyCache string
	t          *T
}

// StartRegTier starts the registry and, if it can, dupproxy.
func StartRegTier(ctx context.Context, t *T, dir string) *RegTier {
	r := &RegTier{Dir: dir, t: t, ProxyRoot: filepath.Join(dir, "dupproxy"), ProxyCache: filepath.Join(dir, "dupproxy-cache")}
	Check(t, os.MkdirAll(dir, 0o755), "registry dir")
	r.Registry = harness.StartRegistry(ctx, t, dir)
	if r.Registry.Proc == nil {
		t.Logf("  (distribution registry not available: using the in-process registry)")
	}
	var err error
	r.RegFwd, err = Forward(r.Registry.Host)
	Check(t, err, "registry relay")
	t.Cleanup(r.RegFwd.Close)
	if err := r.StartProxy(ctx); err != nil {
		r.ProxyErr = err.Error()
		t.Logf("  dupproxy not available: %v", firstLine(err.Error()))
	}
	return r
}

// StartProxy starts `dupproxy serve` with the registry as upstream and
// points ProxyFwd at it (made on first start).
func (r *RegTier) StartProxy(ctx context.Context) error {
	bin := harness.DupproxyBin()
	if _, err := os.Stat(bin); err != nil {
		return fmt.Errorf("%s missing (make build)", bin)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	addr := l.Addr().String()
	l.Close()
	p := harness.StartProc(r.t, "dupproxy", filepath.Join(r.Dir, "dupproxy.log"), nil, bin, "serve",
		"--listen", addr, "--root", r.ProxyRoot, "--cache-dir", r.ProxyCache,
		"--upstream", "http://"+r.Registry.Host, "--log-level", "info")
	if err := waitHTTP(ctx, p, "http://"+addr+"/v2/", 20*time.Second); err != nil {
		p.Kill()
		return err
	}
	r.proxy, r.proxyAddr = p, addr
	if r.ProxyFwd == nil {
		f, err := Forward(addr)
		if err != nil {
			return err
		}
		r.ProxyFwd = f
		r.t.Cleanup(f.Close)
	} else {
		r.ProxyFwd.SetTarget(addr)
	}
	return nil
}

// StopProxy stops dupproxy (SIGTERM, then kill).
func (r *RegTier) StopProxy() {
	if r.proxy != nil {
		r.proxy.Stop(15 * time.Second)
		r.proxy = nil
	}
}

// ProxyUp reports whether dupproxy runs.
func (r *RegTier) ProxyUp() bool { return r.proxy != nil && !r.proxy.Exited() }

// ProxyStats runs `dupproxy stats --json` on the stopped store and restarts it.
func (r *RegTier) ProxyStats(ctx context.Context) (map[string]any, error) {
	r.StopProxy()
	defer func() {
		if err := r.StartProxy(ctx); err != nil {
			r.ProxyErr = "restart after stats: " + err.Error()
		}
	}()
	out, err := harness.Run(ctx, 2*time.Minute, nil, harness.DupproxyBin(), "stats", "--json", "--root", r.ProxyRoot,
		"--cache-dir", r.ProxyCache, "--upstream", "http://"+r.Registry.Host)
	if err != nil {
		return nil, err
	}
	i := strings.Index(out, "{")
	if i < 0 {
		return nil, fmt.Errorf("no JSON in dupproxy stats output: %q", out)
	}
	var m map[string]any
	if err := json.Unmarshal([]byte(out[i:]), &m); err != nil {
		return nil, fmt.Errorf("dupproxy stats: %w", err)
	}
	return m, nil
}

// RegistryBlobBytes is the disk the upstream registry uses for its blobs.
func (r *RegTier) RegistryBlobBytes() int64 {
	return DiskUsage(filepath.Join(r.Dir, "registry-data", "docker", "registry", "v2", "blobs"))
}

// Push uploads the images to the upstream registry (directly, not counted).
func (r *RegTier) Push(ctx context.Context, imgs []*Image) error {
	for _, im := range imgs {
		if _, err := r.Registry.Push(ctx, im.Repo, im.Img); err != nil {
			return err
		}
	}
	return nil
}

// Warm fetches every image through dupproxy once (manifest, config, all
// layer blobs), as the first node of a cluster would: the store is filled
// and later pulls measure a warm registry tier.
func (r *RegTier) Warm(ctx context.Context, imgs []*Image) error {
	if !r.ProxyUp() {
		return fmt.Errorf("dupproxy not running")
	}
	for _, im := range imgs {
		ref, err := name.ParseReference(r.proxyAddr+"/"+im.Repo, name.Insecure)
		if err != nil {
			return err
		}
		cctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
		img, err := remote.Image(ref, remote.WithContext(cctx))
		if err != nil {
			cancel()
			return fmt.Errorf("warm %s: %w", im.Repo, err)
		}
		ls, err := img.Layers()
		if err != nil {
			cancel()
			return err
		}
		for _, l := range ls {
			rc, err := l.Compressed()
			if err != nil {
				cancel()
				return fmt.Errorf("warm %s: %w", im.Repo, err)
			}
			_, err = io.Copy(io.Discard, rc)
			rc.Close()
			if err != nil {
				cancel()
				return fmt.Errorf("warm %s: %w", im.Repo, err)
			}
		}
		cancel()
	}
	return nil
}

// ProxyAddr is dupproxy's own address (not through the relay).
func (r *RegTier) ProxyAddr() string { return r.proxyAddr }

func waitHTTP(ctx context.Context, p *harness.Proc, url string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		if p.Exited() {
			return fmt.Errorf("%s exited\n%s", p.Name, p.Tail())
		}
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if resp, err := http.DefaultClient.Do(req); err == nil {
			resp.Body.Close()
			if resp.StatusCode < 500 {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s not ready after %s\n%s", p.Name, timeout, p.Tail())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}

// WaitSettled waits (up to timeout) until dupproxy has finished its
// background recipe detection for every layer it ingested: until then a
// layer's compressed blob is still kept beside its files, and store bytes
// or restore numbers would measure a transient state. It counts the
// outcomes in dupproxy's log, which is all a client can see of it.
func (r *RegTier) WaitSettled(ctx context.Context, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for {
		b, _ := os.ReadFile(filepath.Join(r.Dir, "dupproxy.log"))
		s := string(b)
		ingested := strings.Count(s, `msg="layer ingested"`)
		settled := strings.Count(s, "restorable by recipe") + strings.Count(s, "no recipe reproduces") + strings.Count(s, "recipe detection failed")
		if settled >= ingested {
			return true
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return false
		}
		time.Sleep(200 * time.Millisecond)
	}
}
