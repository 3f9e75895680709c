package harness

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Dupproxy is a `dupproxy serve` subprocess in front of one upstream.
type Dupproxy struct {
	URL, Host   string // http://127.0.0.1:port, 127.0.0.1:port
	MetricsAddr string
	Root        string
	LogFile     string
	Proc        *Proc
}

func freeAddr(t testing.TB) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// StartDupproxy starts bin/dupproxy under dir with upstream as its default
// upstream and waits until /v2/ answers; it is killed in t.Cleanup.
func StartDupproxy(ctx context.Context, t testing.TB, dir, upstream string) *Dupproxy {
	t.Helper()
	Require(t, DupproxyBin())
	p := &Dupproxy{Root: filepath.Join(dir, "dupproxy"), LogFile: filepath.Join(dir, "dupproxy.log")}
	p.Host, p.MetricsAddr = freeAddr(t), freeAddr(t)
	p.URL = "http://" + p.Host
	cfg := filepath.Join(dir, "dupproxy.toml")
	if err := os.WriteFile(cfg, []byte("no_sync = true\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	p.Proc = StartProc(t, "dupproxy", p.LogFile, nil, DupproxyBin(), "serve", "--config", cfg, "--root", p.Root,
		"--listen", p.Host, "--metrics-address", p.MetricsAddr, "--upstream", upstream)
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	for {
		if p.Proc.Exited() {
			t.Fatalf("dupproxy exited\n%s", p.Proc.Tail())
		}
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, p.URL+"/v2/", nil)
		if resp, err := http.DefaultClient.Do(req); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return p
			}
		}
		select {
		case <-ctx.Done():
			t.Fatalf("dupproxy not ready: %v\n%s", ctx.Err(), p.Proc.Tail())
		case <-time.After(30 * time.Millisecond):
		}
	}
}

// Metric sums the samples of a Prometheus metric whose line starts with
// prefix (name plus optional label selector, e.g. `x_total{api="blob"}`).
func (p *Dupproxy) Metric(ctx context.Context, prefix string) (float64, error) {
	return ScrapeMetric(ctx, "http://"+p.MetricsAddr+"/metrics", prefix)
}

// ScrapeMetric sums the samples of lines starting with prefix at url.
func ScrapeMetric(ctx context.Context, url, prefix string) (float64, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	var sum float64
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") || !strings.HasPrefix(line, prefix) {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err != nil {
			return 0, fmt.Errorf("metric line %q: %w", line, err)
		}
		sum += v
	}
	return sum, sc.Err()
}
