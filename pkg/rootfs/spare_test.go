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

// dropSpares ends every spare of this process (the daemon's would see EOF
// when it exits; a test cleans up at once).
func dropSpares(t *testing.T) {
	// A refill may still be starting one (it runs in the background).
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		spares.Lock()
		busy := len(spares.starting) > 0
		spares.Unlock()
		if !busy || time.Now().After(deadline) {
			break
		}
	}
	spares.Lock()
	defer spares.Unlock()
	for b, p := range spares.byBinary {
		p.assign.Close() // EOF: the spare exits by itself
		select {
		case <-p.exited:
		case <-time.After(5 * time.Second):
			t.Errorf("spare of %s did not exit on EOF", b)
			p.cmd.Process.Kill()
		}
		p.ready.Close()
		delete(spares.byBinary, b)
	}
}

// StartSpare hands the next rootfs to the spare the previous one left
// behind: same server, its log in the rootfs's log file; a spare whose
// daemon goes away exits.
func TestStartSpare(t *testing.T) {
	needRoot(t)
	bin := dupsnapBin(t)
	e := newEnv(t)
	// After newEnv: cleanups run last-registered first, and the spares
	// must be gone before the env's temp dir is removed under them.
	t.Cleanup(func() { dropSpares(t) })
	layers := baseLayers(t, e)
	start := func(name string, layers []digest.Digest) (int, Config, string) {
		dir := filepath.Join(e.dir, name)
		mp := filepath.Join(dir, "rootfs")
		os.MkdirAll(mp, 0o755)
		cfg := Config{Mountpoint: mp, CASRoot: e.cas.Root(), ManifestRoot: filepath.Join(e.dir, "manifests"),
			Layers: layers, StateDir: filepath.Join(dir, "state")}
		logFile := filepath.Join(dir, "rootfs.log")
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		pid, err := StartSpare(ctx, bin, cfg, logFile)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			Stop(ctx, mp)
			forceUnmount(mp)
		})
		return pid, cfg, logFile
	}
	start("a", layers)
	// The first start leaves a spare behind (started in the background).
	spareBin := ServerBinary(bin)
	var sparePID int
	deadline := time.Now().Add(10 * time.Second)
	for sparePID == 0 {
		spares.Lock()
		if p := spares.byBinary[spareBin]; p != nil {
			sparePID = p.cmd.Process.Pid
		}
		spares.Unlock()
		if time.Now().After(deadline) {
			t.Fatal("no spare server after StartSpare")
		}
		time.Sleep(10 * time.Millisecond)
	}
	pid, cfg, logFile := start("b", layers)
	if pid != sparePID {
		t.Fatalf("second start ran pid %d, not the spare %d", pid, sparePID)
	}
	if b, err := os.ReadFile(filepath.Join(cfg.Mountpoint, "etc/passwd")); err != nil || string(b) != "root:x:0:0\n" {
		t.Fatalf("read through the spare's mount: %q %v", b, err)
	}
	if !Alive(cfg.Mountpoint) {
		t.Fatal("spare-served rootfs not Alive")
	}
	if l := servingLine(t, logFile); l == "" {
		t.Fatal("spare's log did not go to the rootfs log")
	}
	// Stop works on it like on any server.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := Stop(ctx, cfg.Mountpoint); err != nil {
		t.Fatal(err)
	}
	if ourProcess(pid) || Mounted(cfg.Mountpoint) {
		t.Fatal("spare-started server left after Stop")
	}

	// The spare after b preloaded b's chain (its tree is cached by now):
	// c, of the same chain, is served from it; d, of another chain, is
	// loaded as usual by the next spare.
	waitSpare := func() {
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			spares.Lock()
			p := spares.byBinary[spareBin]
			spares.Unlock()
			if p != nil {
				return
			}
			if time.Now().After(deadline) {
				t.Fatal("no spare server")
			}
		}
	}
	waitSpare()
	time.Sleep(300 * time.Millisecond) // its preload
	_, cfgC, logC := start("c", layers)
	if l := servingLine(t, logC); !strings.Contains(l, "preloaded=true") || !strings.Contains(l, "premounted=true") {
		t.Errorf("same chain not served from the preload and its premount: %s", l)
	}
	// The attached premount is a dupsnap mount like any other.
	if !Alive(cfgC.Mountpoint) {
		t.Error("premounted rootfs not Alive")
	}
	// Its hardlink index came from the preload: a write through one
	// name of an image hardlink shows through the other.
	if err := os.WriteFile(filepath.Join(cfgC.Mountpoint, "tree/sub/b"), []byte("new b"), 0o644); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(cfgC.Mountpoint, "tree/link-b")); err != nil || string(b) != "new b" {
		t.Errorf("hardlink of a written file on a preloaded server: %q %v", b, err)
	}
	waitSpare()
	_, cfgD, logD := start("d", layers[:1])
	if l := servingLine(t, logD); !strings.Contains(l, "preloaded=false") || !strings.Contains(l, "premounted=false") {
		t.Errorf("another chain served from the preload: %s", l)
	}
	if _, err := os.Stat(filepath.Join(cfgD.Mountpoint, "gone")); err != nil {
		t.Errorf("d does not show its own chain (layer 1 only): %v", err)
	}
	if _, err := os.Stat(filepath.Join(cfgC.Mountpoint, "gone")); err == nil {
		t.Error("c shows a file its top layer deletes")
	}

	// PrepareSpare (after a pull) replaces the spare d left (d's chain)
	// by one that preloads the chain named: e, of that chain, is served
	// from its preload.
	waitSpare()
	spares.Lock()
	old := spares.byBinary[spareBin]
	spares.Unlock()
	PrepareSpare(bin, Config{CASRoot: e.cas.Root(), ManifestRoot: filepath.Join(e.dir, "manifests"), Layers: layers})
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		spares.Lock()
		p := spares.byBinary[spareBin]
		spares.Unlock()
		if p != nil && p != old && len(p.preload) == len(layers) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("PrepareSpare left no spare of the chain")
		}
	}
	select {
	case <-old.exited:
	case <-time.After(5 * time.Second):
		t.Error("the replaced spare did not exit")
	}
	_, _, logE := start("e", layers)
	if l := servingLine(t, logE); !strings.Contains(l, "preloaded=true") {
		t.Errorf("chain named to PrepareSpare not served from the preload: %s", l)
	}
}

// servingLine waits for the server's "serving" log line (logged right
// after the ready signal).
func servingLine(t *testing.T, logFile string) string {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		b, _ := os.ReadFile(logFile)
		for _, l := range strings.Split(string(b), "\n") {
			if strings.Contains(l, "rootfs: serving") {
				return l
			}
		}
		if time.Now().After(deadline) {
			return ""
		}
	}
}
