package harness

import (
	"context"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// Registry is a plain-HTTP OCI registry on 127.0.0.1: the distribution
// `registry` binary from the tools dir when present (a real server, own
// process), else go-containerregistry's in-process registry.
type Registry struct {
	Host string // host:port
	Proc *Proc  // nil when in-process
}

// StartRegistry starts a registry for the test; it stops in t.Cleanup.
func StartRegistry(ctx context.Context, t testing.TB, dir string) *Registry {
	t.Helper()
	bin := filepath.Join(ToolsDir(), "registry")
	if _, err := os.Stat(bin); err == nil && os.Getenv("DUPSNAP_INPROC_REGISTRY") == "" {
		r, err := startDistribution(ctx, t, dir, bin)
		if err == nil {
			return r
		}
		t.Logf("distribution registry failed (%v), using in-process registry", err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{
		Handler:           registry.New(registry.Logger(log.New(io.Discard, "", 0))),
		ReadHeaderTimeout: 10 * time.Second,
	}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return &Registry{Host: l.Addr().String()}
}

func startDistribution(ctx context.Context, t testing.TB, dir, bin string) (*Registry, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	addr := l.Addr().String()
	l.Close()
	cfg := fmt.Sprintf(`version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
http:
  addr: %s
`, filepath.Join(dir, "registry-data"), addr)
	cfgFile := filepath.Join(dir, "registry.yml")
	if err := os.WriteFile(cfgFile, []byte(cfg), 0o644); err != nil {
		return nil, err
	}
	p := StartProc(t, "registry", filepath.Join(dir, "registry.log"), []string{"OTEL_TRACES_EXPORTER=none"}, bin, "serve", cfgFile)
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	for {
		if p.Exited() {
			return nil, fmt.Errorf("registry exited\n%s", p.Tail())
		}
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/v2/", nil)
		if resp, err := http.DefaultClient.Do(req); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return &Registry{Host: addr, Proc: p}, nil
			}
		}
		select {
		case <-ctx.Done():
			p.Kill()
			return nil, fmt.Errorf("registry not ready: %w\n%s", ctx.Err(), p.Tail())
		case <-time.After(30 * time.Millisecond):
		}
	}
}

// Ref is the full reference of repo:tag on this registry.
func (r *Registry) Ref(repoTag string) string { return r.Host + "/" + repoTag }

// Push uploads img as repo:tag over plain HTTP.
func (r *Registry) Push(ctx context.Context, repoTag string, img v1.Image) (string, error) {
	ref, err := name.ParseReference(r.Ref(repoTag), name.Insecure)
	if err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	if err := remote.Write(ref, img, remote.WithContext(ctx)); err != nil {
		return "", fmt.Errorf("push %s: %w", ref, err)
	}
	return ref.String(), nil
}
