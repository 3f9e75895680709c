package proxy_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/dupsnap/dupsnap/proxy"
	"github.com/dupsnap/dupsnap/proxy/proxytest"
)

// TestMeasureBlobGET (DUPSNAP_PROXY_MEASURE=1) compares, in one run, the p50
// latency of a blob GET answered from dupproxy's restore cache with the same
// blob from a distribution v3 registry (_tools/bin/registry) serving it from
// its filesystem, the proxy's upstream; then the cold restore throughput of
// the largest gzip layer. The two servers are interleaved request by request
// so machine load hits both alike. DUPSNAP_PROXY_MEASURE_JSON=FILE writes
// the numbers.
func TestMeasureBlobGET(t *testing.T) {
	if os.Getenv("DUPSNAP_PROXY_MEASURE") == "" {
		t.Skip("set DUPSNAP_PROXY_MEASURE=1 (needs _tools/bin/registry)")
	}
	reg := startDistribution(t)
	up := &proxytest.Upstream{URL: "http://" + reg, Host: reg}
	// Layers like make bench's: gzip (Go default level), 0.25-8 MiB.
	var layers []proxytest.Layer
	for i, n := range []int{4, 16, 48, 96, 128, 256} {
		layers = append(layers, proxytest.Layer{Files: files(fmt.Sprintf("m%d", i), fmt.Sprintf("d%d", i), n, 32<<10), Format: proxytest.Gzip})
	}
	img := up.PushImage(t, "measure/app", "v1", layers)
	root := t.TempDir()
	p := proxytest.StartProxy(t, proxy.Config{Root: root, Upstream: up.URL})
	pullGGCR(t, p.Host, img)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if err := p.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	cl := &http.Client{Timeout: time.Minute}
	get := func(host string, d digest.Digest) time.Duration {
		t0 := time.Now()
		resp, err := cl.Get("http://" + host + "/v2/" + img.Repo + "/blobs/" + d.String())
		if err != nil {
			t.Fatal(err)
		}
		v := d.Verifier()
		_, err = io.Copy(v, resp.Body)
		resp.Body.Close()
		el := time.Since(t0)
		if err != nil || resp.StatusCode != http.StatusOK || !v.Verified() {
			t.Fatalf("GET %s from %s: %s %v", d, host, resp.Status, err)
		}
		return el
	}
	for _, l := range img.Layers { // warm both (connections, page cache)
		get(p.Host, l.Digest)
		get(reg, l.Digest)
	}
	const rounds = 15
	var pd, rd []float64
	for i := 0; i < rounds; i++ {
		for _, l := range img.Layers {
			if i%2 == 0 {
				pd = append(pd, ms(get(p.Host, l.Digest)))
				rd = append(rd, ms(get(reg, l.Digest)))
			} else {
				rd = append(rd, ms(get(reg, l.Digest)))
				pd = append(pd, ms(get(p.Host, l.Digest)))
			}
		}
	}
	res := map[string]float64{"get_p50_ms_dupproxy": median(pd), "get_p50_ms_registry": median(rd)}
	res["get_p50_ratio"] = res["get_p50_ms_dupproxy"] / res["get_p50_ms_registry"]
	t.Logf("blob GET p50 from the restore cache: dupproxy %.3f ms, registry %.3f ms: %.2fx (goal <= 1.2x; %d blobs x %d)",
		res["get_p50_ms_dupproxy"], res["get_p50_ms_registry"], res["get_p50_ratio"], len(img.Layers), rounds)

	// Cold restore: restart over the same store with an emptied cache.
	big := img.Layers[len(img.Layers)-1]
	var cold, ttfb, cpus []float64
	for i := 0; i < 3; i++ {
		p.Stop()
		if err := os.RemoveAll(filepath.Join(root, "cache")); err != nil {
			t.Fatal(err)
		}
		p = proxytest.StartProxy(t, proxy.Config{Root: root, Upstream: up.URL})
		get(p.Host, img.Config.Digest) // connection, not a restore
		cpu0 := cpuTime()
		t0 := time.Now()
		resp, err := cl.Get("http://" + p.Host + "/v2/" + img.Repo + "/blobs/" + big.Digest.String())
		if err != nil {
			t.Fatal(err)
		}
		var one [1]byte
		if _, err := io.ReadFull(resp.Body, one[:]); err != nil {
			t.Fatal(err)
		}
		first := time.Since(t0)
		v := big.Digest.Verifier()
		v.Write(one[:])
		_, err = io.Copy(v, resp.Body)
		resp.Body.Close()
		el := time.Since(t0)
		if err != nil || resp.StatusCode != http.StatusOK || !v.Verified() {
			t.Fatalf("cold GET: %s %v", resp.Status, err)
		}
		cold = append(cold, float64(big.Size)/1e6/el.Seconds())
		ttfb = append(ttfb, ms(first))
		cpus = append(cpus, (cpuTime() - cpu0).Seconds())
	}
	res["cold_restore_mb_s"] = median(cold)
	res["cold_restore_ttfb_ms"] = median(ttfb)
	res["cold_restore_blob_bytes"] = float64(big.Size)
	res["cold_restore_cpu_s"] = median(cpus)
	t.Logf("cold restore of a %.1f MiB gzip layer: %.0f MB/s (goal >= 300), first byte after %.1f ms (runs: %.0f MB/s), %.2f CPU-s per restore (%.0f MB/s per core); load %s", float64(big.Size)/(1<<20), res["cold_restore_mb_s"], res["cold_restore_ttfb_ms"], cold,
		res["cold_restore_cpu_s"], float64(big.Size)/1e6/res["cold_restore_cpu_s"], loadavg())
	if f := os.Getenv("DUPSNAP_PROXY_MEASURE_JSON"); f != "" {
		b, _ := json.MarshalIndent(res, "", "  ")
		if err := os.WriteFile(f, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func ms(d time.Duration) float64 { return d.Seconds() * 1e3 }

// cpuTime is this process's user+system CPU time (the proxy runs in it).
func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func loadavg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	return strings.Join(strings.Fields(string(b))[:3], " ")
}

func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	return s[len(s)/2]
}

// startDistribution runs the distribution v3 registry binary on a free
// port over a temp dir; it is killed at cleanup.
func startDistribution(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(toolsDir(t), "registry")
	if _, err := os.Stat(bin); err != nil {
		t.Skipf("%s not found (run make tools or set DUPSNAP_TOOLS)", bin)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	dir := t.TempDir()
	cfg := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf(`version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
http:
  addr: %s
`, filepath.Join(dir, "data"), addr)), 0o644); err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(filepath.Join(dir, "registry.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "serve", cfg)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		logf.Close()
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get("http://" + addr + "/v2/")
		if err == nil {
			resp.Body.Close()
			return addr
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(logf.Name())
			t.Fatalf("registry did not come up on %s: %v\n%s", addr, err, b)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
