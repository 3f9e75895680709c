package cas

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// crashContent is deterministic per seed, so rounds share content (dedup
// paths run too): mostly small files, some multi-chunk ones.
func crashContent(seed int) []byte {
	n := 1 + seed*997%(64<<10)
	if seed%25 == 0 {
		n = chunkSize + seed*7919%(2*chunkSize)
	}
	return randBytes(uint64(seed), n)
}

// crashChild puts objects in a loop until killed, appending each digest to
// CAS_LOG only after the put (or the batch's Commit) returned.
func crashChild(t *testing.T, root string) {
	s, err := Open(root, Options{Compress: os.Getenv("CAS_COMPRESS") == "1"})
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(os.Getenv("CAS_READY"), nil, 0o644)
	switch os.Getenv("CAS_TEMPS") {
	case "named":
		s.noTmpfile.Store(true)
	case "mixed":
		s.maxAnon = 4
	}
	logf, err := os.OpenFile(os.Getenv("CAS_LOG"), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(uint64(os.Getpid()), uint64(time.Now().UnixNano())))
	// A quarter of the puts repeat earlier content; the rest is new.
	seed := func() int {
		if rng.IntN(4) == 0 {
			return rng.IntN(200)
		}
		return rng.IntN(1 << 30)
	}
	for {
		var done []digest.Digest
		if rng.IntN(3) == 0 {
			d, _, err := s.Put(ctx, bytes.NewReader(crashContent(seed())))
			if err != nil {
				t.Fatal(err)
			}
			done = append(done, d)
		} else {
			b := s.NewBatch()
			for i := rng.IntN(60); i >= 0; i-- {
				d, _, err := b.Put(ctx, bytes.NewReader(crashContent(seed())))
				if err != nil {
					t.Fatal(err)
				}
				done = append(done, d)
			}
			if err := b.Commit(ctx); err != nil {
				t.Fatal(err)
			}
		}
		var sb strings.Builder
		for _, d := range done {
			sb.WriteString(d.String() + "\n")
		}
		if _, err := logf.WriteString(sb.String()); err != nil {
			t.Fatal(err)
		}
	}
}

// TestCrash kills a writer with SIGKILL at random moments; after each kill
// the store must Open and Fsck clean (no partial object under a final
// name, no temp left) and every object whose put returned must be there.
func TestCrash(t *testing.T) {
	dir := t.TempDir()
	logPath := filepath.Join(t.TempDir(), "digests")
	rng := rand.New(rand.NewPCG(1, uint64(time.Now().UnixNano())))
	start := time.Now()
	total := 0
	for round := 0; round < 8 && time.Since(start) < 10*time.Second; round++ {
		compress := "0"
		if round%4 == 3 {
			compress = "1"
		}
		temps := []string{"named", "tmpfile", "mixed"}[round%3]
		ready := filepath.Join(t.TempDir(), "ready")
		child := helperProcess(t, "crash", dir, "CAS_LOG="+logPath, "CAS_COMPRESS="+compress,
			"CAS_TEMPS="+temps, "CAS_READY="+ready)
		waitFile(t, ready, 20*time.Second) // process start is slow on a loaded machine
		time.Sleep(time.Duration(50+rng.IntN(500)) * time.Millisecond)
		child.Process.Signal(syscall.SIGKILL)
		child.Wait()

		s, err := Open(dir, Options{})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		rep, err := s.Fsck(ctx, false)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		if len(rep.Corrupt) != 0 || rep.TempFiles != 0 {
			t.Fatalf("round %d: fsck after kill: %+v", round, rep)
		}
		f, err := os.Open(logPath)
		if errors.Is(err, os.ErrNotExist) {
			s.Close()
			continue // no put returned yet
		}
		if err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(f)
		total = 0
		for sc.Scan() {
			line := sc.Text()
			d, err := digest.Parse(line)
			if err != nil {
				continue // the kill may cut the last line
			}
			total++
			if !s.Has(d) {
				t.Fatalf("round %d: committed object %s missing", round, d)
			}
		}
		f.Close()
		s.Close()
		t.Logf("round %d: %d objects, %d committed puts so far", round, rep.Objects, total)
	}
	if total == 0 {
		t.Fatal("no put ever completed: the test proved nothing")
	}
}
