package proxy_test

import (
	"context"
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

	"github.com/dupsnap/dupsnap/proxy"
	"github.com/dupsnap/dupsnap/proxy/proxytest"
	"github.com/dupsnap/dupsnap/proxy/s3store"
)

// dupproxyBin is $DUPPROXY_BIN (make test sets it) or a fresh build.
func dupproxyBin(t *testing.T) string {
	if p := os.Getenv("DUPPROXY_BIN"); p != "" {
		return p
	}
	bin := filepath.Join(t.TempDir(), "dupproxy")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, "go", "build", "-o", bin, "github.com/dupsnap/dupsnap/cmd/dupproxy").CombinedOutput()
	if err != nil {
		t.Fatalf("building dupproxy: %v\n%s", err, out)
	}
	return bin
}

// startReplica runs bin/dupproxy serve over the bucket, logging to a file.
func startReplica(t *testing.T, bin, upstream string, st proxy.StorageConfig) (*exec.Cmd, string) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	dir := t.TempDir()
	conf := filepath.Join(dir, "dupproxy.toml")
	c := st.S3
	toml := fmt.Sprintf(`listen = %q
root = %q
upstream = %q
no_sync = true
gc_interval = "-1s"
[storage]
type = "s3"
lease_ttl = %q
[storage.s3]
endpoint = %q
bucket = %q
region = %q
access_key = %q
secret_key = %q
path_style = true
`, addr, filepath.Join(dir, "root"), upstream, time.Duration(st.LeaseTTL).String(), c.Endpoint, c.Bucket, c.Region, c.AccessKey, c.SecretKey)
	if err := os.WriteFile(conf, []byte(toml), 0o600); err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(filepath.Join(dir, "dupproxy.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(bin, "serve", "--config", conf, "--log-level", "debug")
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		_ = cmd.Wait()
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get("http://" + addr + "/v2/")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return cmd, addr
			}
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(logf.Name())
			t.Fatalf("dupproxy replica not serving after 30s: %v\n%s", err, b)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// A replica killed with SIGKILL while it uploads a layer leaves the bucket
// consistent (fsck), its lease expires, and the other replica serves the
// layer (ingesting it again) and can collect the debris.
func testS3KillMidIngest(t *testing.T, st proxy.StorageConfig) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	bin := dupproxyBin(t)
	up := proxytest.StartUpstream(t)
	img := up.PushImage(t, "kill/big", "v1", []proxytest.Layer{{Files: files("kill", "data", 300, 8<<10), Format: proxytest.Gzip}})
	cmd, addr := startReplica(t, bin, up.URL, st)
	bk, err := s3store.Open(st.S3)
	if err != nil {
		t.Fatal(err)
	}
	if resp, _ := get(t, "http://"+addr+"/v2/kill/big/manifests/v1", nil); resp.StatusCode != 200 {
		t.Fatal(resp.Status)
	}
	go func() {
		// Fails when the replica dies: expected.
		resp, err := http.Get("http://" + addr + "/v2/kill/big/blobs/" + img.Layers[0].Digest.String())
		if err == nil {
			resp.Body.Close()
		}
	}()
	// Kill once objects are being uploaded under a lease, before the manifest.
	var objects, layouts int
	for {
		objects, layouts = 0, 0
		leases := 0
		_ = bk.List(ctx, "", func(i s3store.Info) error {
			switch {
			case strings.HasPrefix(i.Key, "objects/"):
				objects++
			case strings.HasPrefix(i.Key, "layouts/"):
				layouts++
			case strings.HasPrefix(i.Key, "locks/lease-"):
				leases++
			}
			return nil
		})
		if leases > 0 && objects > 0 {
			break
		}
		if ctx.Err() != nil {
			t.Fatal("never saw the ingest upload objects")
		}
		time.Sleep(5 * time.Millisecond)
	}
	_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	_ = cmd.Wait()
	t.Logf("killed with %d objects and %d layout manifests in the bucket", objects, layouts)

	// fsck from an operator's host: a separate process over the bucket.
	checkConf := filepath.Join(t.TempDir(), "check.toml")
	c := st.S3
	_ = os.WriteFile(checkConf, []byte(fmt.Sprintf("[storage]\ntype = \"s3\"\n[storage.s3]\nendpoint = %q\nbucket = %q\naccess_key = %q\nsecret_key = %q\npath_style = true\n",
		c.Endpoint, c.Bucket, c.AccessKey, c.SecretKey)), 0o600)
	out, err := exec.CommandContext(ctx, bin, "fsck", "--config", checkConf, "--root", t.TempDir()).CombinedOutput()
	if err != nil {
		t.Fatalf("dupproxy fsck after kill -9: %v\n%s", err, out)
	}
	t.Logf("fsck:\n%s", out)

	// GC on another replica waits out the dead lease and collects the debris;
	// then that replica serves the image (ingesting it again).
	b := proxytest.StartProxy(t, proxy.Config{Upstream: up.URL, Storage: st, GCGrace: proxy.Duration(time.Millisecond)})
	start := time.Now()
	rep, err := b.GC(ctx)
	if err != nil {
		t.Fatalf("gc after kill: %v", err)
	}
	t.Logf("gc after kill (took %s, dead lease ttl %s): %+v", time.Since(start).Round(time.Millisecond), time.Duration(st.LeaseTTL), rep)
	if rep.Objects < objects {
		t.Fatalf("gc freed %d objects, want the %d the killed ingest left", rep.Objects, objects)
	}
	if err := tryPull(b.Host, img); err != nil {
		t.Fatal(err)
	}
	checkStore(t, b.Server)
}
