package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/dupsnap/dupsnap/proxy"
	"github.com/dupsnap/dupsnap/proxy/proxytest"
)

func dupproxyBin(t *testing.T) string {
	b := os.Getenv("DUPPROXY_BIN")
	if b == "" {
		b, _ = filepath.Abs("../../bin/dupproxy")
	}
	if _, err := os.Stat(b); err != nil {
		t.Skipf("dupproxy binary not found at %s (make build, or set DUPPROXY_BIN)", b)
	}
	return b
}

func freeAddr(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// TestServeStatsGC runs the real binary: serve from a TOML config, pull an
// image through it, stop it with SIGTERM, then stats and gc offline.
func TestServeStatsGC(t *testing.T) {
	bin := dupproxyBin(t)
	up := proxytest.StartUpstream(t)
	body := make([]byte, 64<<10)
	for i := range body {
		body[i] = byte(i * 7)
	}
	up.PushImage(t, "cli/img", "v1", []proxytest.Layer{{Files: []proxytest.File{{Name: "a", Body: body}, {Name: "b", Body: body}}, Format: proxytest.Gzip}})
	dir := t.TempDir()
	listen, metrics := freeAddr(t), freeAddr(t)
	cfg := fmt.Sprintf("listen = %q\nmetrics_address = %q\nroot = %q\nupstream = %q\ncache_size = \"64MiB\"\nno_sync = true\n",
		listen, metrics, filepath.Join(dir, "root"), up.URL)
	if err := os.WriteFile(filepath.Join(dir, "config.toml"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(filepath.Join(dir, "serve.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(bin, "serve", "--config", filepath.Join(dir, "config.toml"))
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	done := make(chan struct{})
	go func() { exited <- cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
		}
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := http.Get("http://" + listen + "/v2/")
		if err == nil {
			resp.Body.Close()
			break
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(logf.Name())
			t.Fatalf("serve did not come up: %v\n%s", err, b)
		}
		time.Sleep(100 * time.Millisecond)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	ref, _ := name.ParseReference(listen+"/cli/img:v1", name.Insecure)
	img, err := remote.Image(ref, remote.WithContext(ctx))
	if err != nil {
		t.Fatal(err)
	}
	ls, _ := img.Layers()
	rc, err := ls[0].Compressed()
	if err != nil {
		t.Fatal(err)
	}
	rc.Close()
	resp, err := http.Get("http://" + metrics + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("metrics: %s", resp.Status)
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("serve exit: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("serve did not stop on SIGTERM")
	}
	run := func(args ...string) string {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("%v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	var st proxy.Stats
	if err := json.Unmarshal([]byte(run("stats", "--config", filepath.Join(dir, "config.toml"), "--json", "--log-level", "error")), &st); err != nil {
		t.Fatal(err)
	}
	if st.Images != 1 || st.Layers != 1 || st.Objects != 1 {
		t.Fatalf("stats: %+v (want 1 image, 1 layer, 1 object: a and b are equal)", st)
	}
	out := run("gc", "--config", filepath.Join(dir, "config.toml"), "--log-level", "error")
	if !strings.Contains(out, "images evicted: 0") {
		t.Fatalf("gc: %s", out)
	}
	if out := run("serve", "--help"); !strings.Contains(out, "--cache-size") && !strings.Contains(out, "-cache-size") {
		t.Fatalf("help: %s", out)
	}
}
