package rootfs

import (
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The workloads of TestMeasure. Each runs on one rootfs (dupsnap or
// overlayfs) given by its mountpoint and returns a figure; the same code
// runs on both, in the same process, so only the filesystem differs.

const (
	measureBig   = 256 << 20 // image files: "big" (clean reads, 4 KiB overwrite), "rand" (random writes)
	measureOps   = 2048      // random 4 KiB writes per run (8 MiB over 256 MiB)
	measureReads = 4096      // random 4 KiB reads per run
	measureSmall = 1000      // small new files per run
)

func mbps(bytes int64, d time.Duration) float64 { return float64(bytes) / (1 << 20) / d.Seconds() }

// seqRead reads p to the end with 1 MiB reads and returns MB/s.
func seqRead(t *testing.T, p string, want int64) float64 {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	start := time.Now()
	var n int64
	for {
		k, err := f.Read(buf)
		n += int64(k)
		if err != nil {
			break
		}
	}
	d := time.Since(start)
	if n != want {
		t.Fatalf("read %d bytes of %s, want %d", n, p, want)
	}
	return mbps(n, d)
}

// randRead does measureReads 4 KiB preads at random aligned offsets of the
// first size bytes of p and returns MB/s.
func randRead(t *testing.T, p string, size int64, seed int64) float64 {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rng := rand.New(rand.NewSource(seed))
	buf := make([]byte, 4096)
	start := time.Now()
	for i := 0; i < measureReads; i++ {
		if _, err := f.ReadAt(buf, rng.Int63n(size/4096)*4096); err != nil {
			t.Fatal(err)
		}
	}
	return mbps(measureReads*4096, time.Since(start))
}

// overwrite4K opens an image file for writing, writes 4 KiB in its middle
// and closes it: the copy-up (or block CoW) cost a container sees.
func overwrite4K(t *testing.T, p string) time.Duration {
	t.Helper()
	start := time.Now()
	f, err := os.OpenFile(p, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(make([]byte, 4096), measureBig/2); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return time.Since(start)
}

// randWrite opens an image file (copy-up included), does measureOps
// random aligned 4 KiB writes, fsyncs and closes; returns MB/s written.
func randWrite(t *testing.T, p string, seed int64) float64 {
	t.Helper()
	rng := rand.New(rand.NewSource(seed))
	buf := make([]byte, 4096)
	rng.Read(buf)
	start := time.Now()
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < measureOps; i++ {
		buf[0] = byte(i)
		if _, err := f.WriteAt(buf, rng.Int63n(measureBig/4096)*4096); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return mbps(measureOps*4096, time.Since(start))
}

// smallFiles creates measureSmall files of 4 KiB in 10 new dirs (create,
// write, close; no fsync, like an unpack or a build); returns files/s.
func smallFiles(t *testing.T, root string) float64 {
	t.Helper()
	buf := make([]byte, 4096)
	start := time.Now()
	for d := 0; d < 10; d++ {
		dir := filepath.Join(root, "small", fmt.Sprint(d))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		for i := 0; i < measureSmall/10; i++ {
			f, err := os.OpenFile(filepath.Join(dir, fmt.Sprint(i)), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
			if err != nil {
				t.Fatal(err)
			}
			buf[0] = byte(i)
			if _, err := f.Write(buf); err != nil {
				t.Fatal(err)
			}
			f.Close()
		}
	}
	return measureSmall / time.Since(start).Seconds()
}

// largeFile writes a new measureBig file with 1 MiB writes, fsyncs and
// closes it; returns MB/s.
func largeFile(t *testing.T, p string) float64 {
	t.Helper()
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i * 7)
	}
	start := time.Now()
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	for n := 0; n < measureBig; n += len(buf) {
		if _, err := f.Write(buf); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return mbps(measureBig, time.Since(start))
}

// walkUsr walks and lstats everything under root/usr (after one warm-up
// walk) and returns the fastest of 3 walks, in entries/s.
func walkUsr(t *testing.T, root string, want int) float64 {
	t.Helper()
	var best time.Duration
	for i := 0; i < 4; i++ {
		start := time.Now()
		n := 0
		filepath.Walk(filepath.Join(root, "usr"), func(p string, fi os.FileInfo, err error) error { n++; return nil })
		if d := time.Since(start); i > 0 && (best == 0 || d < best) {
			best = d
		}
		if n != want {
			t.Fatalf("walked %d entries under %s, want %d", n, root, want)
		}
	}
	return float64(want) / best.Seconds()
}

// duKiB is the disk space allocated below dir.
func duKiB(dir string) float64 {
	var n int64
	filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err == nil {
			n += fi.Sys().(*syscall.Stat_t).Blocks * 512
		}
		return nil
	})
	return float64(n) / 1024
}

// syncfs commits everything of the filesystem at root.
func syncfs(t *testing.T, root string) {
	t.Helper()
	f, err := os.Open(root)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil { // fsync of the root dir: dupsnap commits its region
		t.Fatal(err)
	}
	if err := unix.Syncfs(int(f.Fd())); err != nil {
		t.Fatal(err)
	}
}
