package rootfs

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"
)

var (
	binOnce sync.Once
	binPath string
	binErr  error
)

// dupsnapBin is $DUPSNAP_BIN or a binary path whose server (SmallBinary)
// is built once for this test run.
func dupsnapBin(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("DUPSNAP_BIN"); p != "" {
		return p
	}
	binOnce.Do(func() {
		dir, err := os.MkdirTemp("", "rootfs-bin")
		if err != nil {
			binErr = err
			return
		}
		// Only the small server is built (Start prefers it next to the
		// named dupsnap binary, which need not exist): a fraction of the
		// build time of cmd/dupsnap. `dupsnap rootfs` is the integration
		// tests' business.
		binPath = filepath.Join(dir, "dupsnap")
		ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, "go", "build", "-o", filepath.Join(dir, SmallBinary), "github.com/dupsnap/dupsnap/cmd/dupsnap-rootfs")
		out, err := cmd.CombinedOutput()
		if err != nil {
			binErr = fmt.Errorf("%w: %s", err, out)
			os.RemoveAll(dir)
			binPath = ""
		}
	})
	if binErr != nil {
		t.Fatalf("build dupsnap: %v", binErr)
	}
	return binPath
}

func TestStartStopProcess(t *testing.T) {
	needRoot(t)
	bin := dupsnapBin(t)
	e := newEnv(t)
	layers := baseLayers(t, e)
	dir := filepath.Join(e.dir, "snap")
	mp := filepath.Join(dir, "rootfs")
	os.MkdirAll(mp, 0o755)
	cfg := Config{Mountpoint: mp, CASRoot: e.cas.Root(), ManifestRoot: filepath.Join(e.dir, "manifests"),
		Layers: layers, StateDir: filepath.Join(dir, "state")}
	logFile := filepath.Join(dir, "rootfs.log")
	start := func() int { return startServer(t, bin, cfg, logFile) }
	stop := func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := Stop(ctx, mp); err != nil {
			t.Fatal(err)
		}
	}
	pid := start()
	if !Alive(mp) {
		t.Fatal("not alive after Start")
	}
	if b, err := os.ReadFile(filepath.Join(mp, "etc/passwd")); err != nil || string(b) != "root:x:0:0\n" {
		t.Fatalf("read through subprocess: %q %v", b, err)
	}
	// Only fsync'd writes must survive a kill -9 (the region commits its
	// metadata at fsync or every syncInterval).
	if f, err := os.Create(filepath.Join(mp, "etc/new")); err != nil {
		t.Fatal(err)
	} else {
		f.WriteString("kept")
		if err := f.Sync(); err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	// kill -9: the mount stays but is dead; Alive says so, Stop cleans up.
	syscall.Kill(pid, syscall.SIGKILL)
	deadline := time.Now().Add(10 * time.Second)
	for Alive(mp) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if Alive(mp) {
		t.Fatal("Alive after kill -9")
	}
	stop()
	if Mounted(mp) {
		t.Fatal("still mounted after Stop")
	}
	// Restart: the state written before the kill is there.
	pid = start()
	if b, err := os.ReadFile(filepath.Join(mp, "etc/new")); err != nil || string(b) != "kept" {
		t.Fatalf("after restart: %q %v", b, err)
	}
	stop()
	if Mounted(mp) || ourProcess(pid) {
		t.Fatal("server or mount left after graceful Stop")
	}
}
