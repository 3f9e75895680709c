package cas

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// benchFiles is a layer-like mix: 2000 files of 1-64 KiB plus four of
// several MiB (about 92 MiB in all), deterministic.
var benchFiles = sync.OnceValues(func() ([][]byte, int64) {
	var files [][]byte
	var total int64
	for i := 0; i < 2000; i++ {
		files = append(files, randBytes(uint64(i), 1024+(i*7919)%(63<<10)))
	}
	for i, mib := range []int{4, 6, 8, 10} {
		files = append(files, randBytes(uint64(10000+i), mib<<20))
	}
	for _, f := range files {
		total += int64(len(f))
	}
	return files, total
})

// BenchmarkSHA256 is the reference: the raw hash rate over the same bytes.
func BenchmarkSHA256(b *testing.B) {
	files, total := benchFiles()
	b.SetBytes(total)
	for b.Loop() {
		for _, f := range files {
			h := sha256.New()
			h.Write(f)
			h.Sum(nil)
		}
	}
}

// BenchmarkBatchPut is durable ingest into an empty store, Commit included.
func BenchmarkBatchPut(b *testing.B) {
	// One parent for all cases, removed at the very end: freshly deleted
	// inodes near tmp/ would slow the next case's creates (see benchDir).
	parent := benchDir(b)
	for _, c := range []struct {
		name  string
		opts  Options
		strat syncStrategy
	}{
		{"syncfs", Options{}, syncFS},
		{"syncfs-kickall", Options{}, syncFS},
		{"syncfs-nokick", Options{}, syncFS},
		{"syncfs-direct", Options{DirectWrites: true}, syncFS},
		{"perfile", Options{}, syncPerFile},
		{"nosync", Options{NoSync: true}, syncAuto},
		{"zstd-syncfs", Options{Compress: true}, syncFS},
	} {
		b.Run(c.name, func(b *testing.B) {
			files, total := benchFiles()
			b.SetBytes(total)
			base, err := os.MkdirTemp(parent, c.name+"-")
			if err != nil {
				b.Fatal(err)
			}
			ctx := context.Background()
			i := 0
			var commit time.Duration
			defer func() {
				// Commit's share: the sync strategy's cost, apart from the
				// per-file create cost of the put phase.
				b.ReportMetric(float64(commit.Milliseconds())/float64(max(i, 1)), "commit-ms/op")
			}()
			for b.Loop() {
				b.StopTimer()
				root := filepath.Join(base, fmt.Sprint(i))
				i++
				s, err := Open(root, c.opts)
				if err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				bt := s.NewBatch()
				bt.strat = c.strat
				switch c.name {
				case "syncfs-kickall":
					kickMode = kickAll
				case "syncfs-nokick":
					kickMode = kickNone
				}
				for _, f := range files {
					if _, _, err := bt.Put(ctx, bytes.NewReader(f)); err != nil {
						b.Fatal(err)
					}
				}
				t0 := time.Now()
				if err := bt.Commit(ctx); err != nil {
					b.Fatal(err)
				}
				commit += time.Since(t0)
				b.StopTimer()
				kickMode = kickStreams
				s.Close()
				// Stores are removed only at the end: on ext4 without a
				// journal, inodes deleted in the last seconds are skipped
				// (slowly) by the inode allocator, so deleting here would
				// slow down the next iteration's creates.
				b.StartTimer()
			}
		})
	}
}

// benchDir is where benchmark stores go: DUPSNAP_BENCH_DIR, else /var/tmp.
// Not /tmp: on ext4 without a journal the inode allocator skips (one by
// one, ~1 ms of kernel CPU per create measured here) inodes deleted in the
// last seconds near the parent directory, and /tmp is where every test on
// the machine creates and deletes files.
func benchDir(b *testing.B) string {
	parent := os.Getenv("DUPSNAP_BENCH_DIR")
	if parent == "" {
		parent = "/var/tmp"
	}
	dir, err := os.MkdirTemp(parent, "casbench-")
	if err != nil {
		return b.TempDir()
	}
	b.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}
