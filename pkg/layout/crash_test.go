package layout

import (
	"bytes"
	"context"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

const crashEnv = "DUPSNAP_LAYOUT_CRASH_ROOT"

// crashLayer is a layer with files shared between layers and new ones.
func crashLayer(t testing.TB, seed int) []byte {
	rng := rand.New(rand.NewSource(int64(seed)))
	var ents []tarEnt
	for i := 0; i < 40; i++ {
		size := rng.Intn(200000)
		content := pseudoRandom(rng.Intn(60), size) // seeds repeat: dedup across layers
		ents = append(ents, file(fmt.Sprintf("d%d/f%d", i%5, i), string(content)))
	}
	return mkTar(t, ents...)
}

// TestCrashChild is the child of TestCrashImport: it imports layers in a loop
// until killed.
func TestCrashChild(t *testing.T) {
	root := os.Getenv(crashEnv)
	if root == "" {
		t.Skip("child of TestCrashImport only")
	}
	_, s, err := OpenRoot(root)
	must(t, err)
	ctx := context.Background()
	base, _ := strconv.Atoi(os.Getenv(crashEnv + "_SEED"))
	for i := 0; ; i++ {
		layer := crashLayer(t, base*1000+i)
		enc := encodings[i%3]
		if _, err := s.Import(ctx, bytes.NewReader(enc.enc(t, layer)), IngestOptions{}); err != nil {
			t.Fatal(err)
		}
		if i%4 == 3 {
			s.Collect(ctx, 0)
		}
	}
}

// TestCrashImport kills importing children with SIGKILL at random points;
// afterwards the CAS verifies clean and every stored manifest exports to
// its diffID.
func TestCrashImport(t *testing.T) {
	if testing.Short() {
		t.Skip("short")
	}
	root := t.TempDir()
	rng := rand.New(rand.NewSource(time.Now().UnixNano()))
	deadline := time.Now().Add(10 * time.Second)
	for round := 0; round < 6 && time.Now().Before(deadline); round++ {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		logf, err := os.Create(filepath.Join(t.TempDir(), "child.log"))
		must(t, err)
		cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestCrashChild$", "-test.count=1")
		cmd.Env = append(os.Environ(), crashEnv+"="+root, fmt.Sprintf("%s_SEED=%d", crashEnv, round))
		cmd.Stdout, cmd.Stderr = logf, logf
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		must(t, cmd.Start())
		t.Cleanup(func() { _ = cmd.Process.Kill(); cancel() })
		time.Sleep(time.Duration(200+rng.Intn(1200)) * time.Millisecond)
		_ = cmd.Process.Signal(syscall.SIGKILL)
		_ = cmd.Wait()
		cancel()
		logf.Close()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c, s, err := OpenRoot(root)
	must(t, err)
	defer c.Close()
	rep, err := c.Fsck(ctx, false)
	must(t, err)
	if len(rep.Corrupt) > 0 {
		t.Fatalf("fsck after crashes: %d corrupt objects", len(rep.Corrupt))
	}
	ids, err := s.List(ctx)
	must(t, err)
	if len(ids) == 0 {
		t.Fatal("no layer was imported before the kills (machine too slow?)")
	}
	for _, id := range ids {
		m, err := s.Get(ctx, id)
		must(t, err)
		h := digest.SHA256.Digester()
		if err := Export(ctx, c, m, h.Hash()); err != nil {
			t.Fatalf("layer %s: %v", id, err)
		}
		if h.Digest() != id {
			t.Fatalf("layer %s exports to %s", id, h.Digest())
		}
	}
	t.Logf("%d layers, %d objects, %d temp files left by kills", len(ids), rep.Objects, rep.TempFiles)
}
