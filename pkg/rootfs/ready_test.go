package rootfs

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// A server that dies before its mount is up fails Start at once (EOF on
// the ready pipe), with its log in the error, not after ctx runs out.
func TestStartServerDiesEarly(t *testing.T) {
	needRoot(t)
	bin := dupsnapBin(t)
	e := newEnv(t)
	mp := filepath.Join(e.dir, "snap", "rootfs")
	os.MkdirAll(mp, 0o755)
	cfg := Config{Mountpoint: mp, CASRoot: e.cas.Root(), ManifestRoot: filepath.Join(e.dir, "manifests"),
		Layers: []digest.Digest{digest.FromString("no such layer")}, ReadOnly: true}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	t0 := time.Now()
	pid, err := Start(ctx, bin, cfg, filepath.Join(e.dir, "snap", "rootfs.log"))
	if err == nil {
		t.Cleanup(func() { forceUnmount(mp) })
		t.Fatalf("Start succeeded (pid %d) with a missing layer", pid)
	}
	if el := time.Since(t0); el > 10*time.Second {
		t.Fatalf("Start took %v to notice the dead server", el)
	}
	if !strings.Contains(err.Error(), "server exited") || !strings.Contains(err.Error(), "not found") {
		t.Fatalf("error lacks cause or log: %v", err)
	}
	if Mounted(mp) {
		t.Fatal("mounted after failed Start")
	}
}

// Start returns only when the server says it is ready: the mount is there
// and serves at once.
func TestStartReady(t *testing.T) {
	needRoot(t)
	bin := dupsnapBin(t)
	e := newEnv(t)
	layers := baseLayers(t, e)
	mp := filepath.Join(e.dir, "snap", "rootfs")
	os.MkdirAll(mp, 0o755)
	cfg := Config{Mountpoint: mp, CASRoot: e.cas.Root(), ManifestRoot: filepath.Join(e.dir, "manifests"),
		Layers: layers, ReadOnly: true}
	pid := startServer(t, bin, cfg, filepath.Join(e.dir, "snap", "rootfs.log"))
	if !Mounted(mp) || !ourProcess(pid) {
		t.Fatal("Start returned before the mount was up")
	}
	if b, err := os.ReadFile(filepath.Join(mp, "etc/passwd")); err != nil || string(b) != "root:x:0:0\n" {
		t.Fatalf("read right after Start: %q %v", b, err)
	}
	// (Whether the server closed its ready fd cannot be told from
	// /proc/PID/fd/3: the number is reused at once, e.g. by go-fuse's
	// splice pipes.)
	// A live server is waited for no longer than asked.
	t1 := time.Now()
	if waitExit(context.Background(), pid, 50*time.Millisecond) {
		t.Fatal("waitExit: live server reported gone")
	}
	if el := time.Since(t1); el > time.Second {
		t.Fatalf("waitExit(50ms) took %v", el)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	t0 := time.Now()
	if err := Stop(ctx, mp); err != nil {
		t.Fatal(err)
	}
	if ourProcess(pid) || Mounted(mp) {
		t.Fatalf("server or mount left after Stop (%v)", time.Since(t0))
	}
}
