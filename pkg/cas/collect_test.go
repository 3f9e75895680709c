package cas

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

const helperEnv = "DUPSNAP_CAS_HELPER"

// helperProcess re-executes the test binary as a child running one of the
// helper modes (see TestHelperProcess); it is killed in t.Cleanup and logs
// to a file, never to the test's stdout/stderr.
func helperProcess(t *testing.T, mode, root string, extra ...string) *exec.Cmd {
	t.Helper()
	logf, err := os.Create(filepath.Join(t.TempDir(), mode+".log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), helperEnv+"="+mode, "CAS_ROOT="+root)
	cmd.Env = append(cmd.Env, extra...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		logf.Close()
	})
	return cmd
}

func waitFile(t *testing.T, path string, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if _, err := os.Stat(path); err == nil {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s", path)
}

func TestCollect(t *testing.T) {
	s := openStore(t, Options{})
	ctx := testCtx(t)
	put := func(b []byte) digest.Digest {
		d, _, err := s.Put(ctx, bytes.NewReader(b))
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	kept := put([]byte("kept"))
	garbage := put(randBytes(1, 3*chunkSize))
	young := put([]byte("young garbage"))
	old := time.Now().Add(-time.Hour)
	for _, d := range []digest.Digest{kept, garbage} {
		if err := os.Chtimes(s.Path(d), old, old); err != nil {
			t.Fatal(err)
		}
	}
	n, freed, err := s.Collect(ctx, func(d digest.Digest) bool { return d == kept }, 10*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if n != 1 || freed != 3*chunkSize {
		t.Fatalf("collected %d objects, %d bytes; want 1, %d", n, freed, 3*chunkSize)
	}
	if !s.Has(kept) || s.Has(garbage) || !s.Has(young) {
		t.Fatalf("after collect: kept=%v garbage=%v young=%v", s.Has(kept), s.Has(garbage), s.Has(young))
	}
	// grace 0: the young one goes too.
	if n, _, err := s.Collect(ctx, func(d digest.Digest) bool { return d == kept }, 0); err != nil || n != 1 || s.Has(young) {
		t.Fatalf("grace 0: %d %v", n, err)
	}
}

// A lease held by another process (and one held in this process) keeps
// Collect out entirely; once released, Collect proceeds.
func TestCollectWaitsForLease(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	ctx := testCtx(t)
	d, _, err := s.Put(ctx, bytes.NewReader([]byte("unreferenced but leased")))
	if err != nil {
		t.Fatal(err)
	}
	none := func(digest.Digest) bool { return false }
	tryCollect := func(timeout time.Duration) (int, error) {
		c, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		n, _, err := s.Collect(c, none, 0)
		return n, err
	}

	ready := filepath.Join(t.TempDir(), "ready")
	child := helperProcess(t, "lease", dir, "CAS_READY="+ready)
	waitFile(t, ready, 20*time.Second)
	if _, err := tryCollect(300 * time.Millisecond); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("collect with a foreign lease held: %v", err)
	}
	if !s.Has(d) {
		t.Fatal("leased object collected")
	}
	child.Process.Signal(syscall.SIGKILL)
	child.Wait()

	release, err := s.Lease(ctx)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { _, err := tryCollect(300 * time.Millisecond); done <- err }()
	if err := <-done; !errors.Is(err, context.DeadlineExceeded) || !s.Has(d) {
		t.Fatalf("collect with own lease held: %v", err)
	}
	release()
	release() // idempotent
	if n, err := tryCollect(30 * time.Second); err != nil || n != 1 || s.Has(d) {
		t.Fatalf("collect after release: %d %v", n, err)
	}
}

// TestHelperProcess is not a test: it is the body of child processes.
func TestHelperProcess(t *testing.T) {
	mode := os.Getenv(helperEnv)
	if mode == "" {
		t.Skip("helper process only")
	}
	root := os.Getenv("CAS_ROOT")
	switch mode {
	case "lease":
		s, err := Open(root, Options{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.Lease(context.Background()); err != nil {
			t.Fatal(err)
		}
		os.WriteFile(os.Getenv("CAS_READY"), nil, 0o644)
		time.Sleep(time.Minute) // killed by the parent
	case "crash":
		crashChild(t, root)
	}
	os.Exit(0)
}
