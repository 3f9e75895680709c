package proxy_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dupsnap/dupsnap/proxy"
	"github.com/dupsnap/dupsnap/proxy/proxytest"
)

func toolsDir(t *testing.T) string {
	if d := os.Getenv("DUPSNAP_TOOLS"); d != "" {
		return d
	}
	d, _ := filepath.Abs(filepath.Join("..", "_tools", "bin"))
	return d
}

// startContainerd runs a private containerd (own root, state and socket,
// CRI disabled) for the test and returns its socket.
func startContainerd(t *testing.T, tools string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "dpctr")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "c.sock")
	cfg := fmt.Sprintf(`version = 3
root = %q
state = %q
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.runtime", "io.containerd.cri.v1.images",
  "io.containerd.podsandbox.controller.v1.podsandbox", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.blockfile",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing", "io.containerd.nri.v1.nri"]
[grpc]
  address = %q
[ttrpc]
  address = %q
`, filepath.Join(dir, "root"), filepath.Join(dir, "state"), sock, sock+".ttrpc")
	if err := os.WriteFile(filepath.Join(dir, "config.toml"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(filepath.Join(dir, "containerd.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(filepath.Join(tools, "containerd"), "--config", filepath.Join(dir, "config.toml"))
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
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err := exec.CommandContext(ctx, filepath.Join(tools, "ctr"), "-a", sock, "version").Run()
		cancel()
		if err == nil {
			return sock
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(logf.Name())
			t.Fatalf("containerd did not start: %v\n%s", err, b)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// TestCtrPullThroughMirror: containerd v2.4.2 pulls images with gzip, zstd and
// uncompressed layers through dupproxy configured as a hosts.toml mirror of
// a registry host that does not resolve, so everything must come through the
// proxy (?ns= picks the upstream); containerd verifies every digest.
func TestCtrPullThroughMirror(t *testing.T) {
	tools := toolsDir(t)
	for _, b := range []string{"containerd", "ctr"} {
		if _, err := os.Stat(filepath.Join(tools, b)); err != nil {
			t.Skipf("%s not found in %s (run make tools or set DUPSNAP_TOOLS)", b, tools)
		}
	}
	if os.Geteuid() != 0 {
		t.Skip("containerd needs root")
	}
	up := proxytest.StartUpstream(t)
	const regHost = "registry.dupproxy.invalid:5000"
	var imgs []*proxytest.Image
	for _, f := range []string{proxytest.Gzip, proxytest.Zstd, proxytest.Uncompressed} {
		imgs = append(imgs, up.PushImage(t, "lib/"+f, "v1", []proxytest.Layer{
			{Files: files("ctr-base", "usr", 4, 16<<10), Format: f},
			{Files: files("ctr-"+f, "app", 2, 8<<10), Format: f},
		}))
	}
	p := proxytest.StartProxy(t, proxy.Config{Upstreams: map[string]proxy.UpstreamConfig{regHost: {URL: up.URL}}})
	hosts := t.TempDir()
	hd := filepath.Join(hosts, regHost)
	if err := os.MkdirAll(hd, 0o755); err != nil {
		t.Fatal(err)
	}
	toml := fmt.Sprintf("server = \"http://%s\"\n\n[host.\"http://%s\"]\n  capabilities = [\"pull\", \"resolve\"]\n", regHost, p.Host)
	if err := os.WriteFile(filepath.Join(hd, "hosts.toml"), []byte(toml), 0o644); err != nil {
		t.Fatal(err)
	}
	sock := startContainerd(t, tools)
	ctr := func(args ...string) string {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
		defer cancel()
		out, err := exec.CommandContext(ctx, filepath.Join(tools, "ctr"), append([]string{"-a", sock, "-n", "dupproxytest"}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("ctr %v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	for _, img := range imgs {
		ref := regHost + "/" + img.Repo + ":" + img.Tag
		ctr("image", "pull", "--local", "--hosts-dir", hosts, "--snapshotter", "native", ref)
		ls := ctr("image", "ls")
		if !strings.Contains(ls, img.Digest.String()) {
			t.Fatalf("%s not listed with digest %s:\n%s", ref, img.Digest, ls)
		}
		content := ctr("content", "ls", "-q")
		for _, l := range img.Layers {
			if !strings.Contains(content, l.Digest.String()) {
				t.Fatalf("layer %s of %s missing from containerd's content store", l.Digest, ref)
			}
		}
	}
}
