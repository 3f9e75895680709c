package recipe

import (
	"bytes"
	stdgzip "compress/gzip"
	"context"
	"io"
	"os"
	"runtime"
	"sort"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// TestThroughputReport measures Detect time and Apply MB/s per encoder on a
// ~64 MB tar of real files. Too slow for CI; run with
// DUPSNAP_RECIPE_BENCH=1 go test -run ThroughputReport -v ./proxy/recipe
func TestThroughputReport(t *testing.T) {
	if os.Getenv("DUPSNAP_RECIPE_BENCH") == "" {
		t.Skip("set DUPSNAP_RECIPE_BENCH=1")
	}
	dir := os.Getenv("DUPSNAP_RECIPE_BENCH_DIR")
	if dir == "" {
		dir = "/usr/lib/x86_64-linux-gnu"
	}
	tb := realTar(t, dir, 64<<20)
	t.Logf("tar: %d bytes from %s", len(tb), dir)
	for _, b := range builders() {
		if os.Getenv("DUPSNAP_RECIPE_BENCH_ONLY") != "" && os.Getenv("DUPSNAP_RECIPE_BENCH_ONLY") != b.name {
			continue
		}
		var blob bytes.Buffer
		start := time.Now()
		b.fn(t, &blob, tb)
		build := time.Since(start)
		start = time.Now()
		r, err := Detect(context.Background(), bytes.NewReader(blob.Bytes()), int64(blob.Len()), digest.FromBytes(blob.Bytes()), tarFunc(tb))
		det := time.Since(start)
		if err != nil || r == nil {
			t.Fatalf("%s: Detect: %v %v", b.name, r, err)
		}
		start = time.Now()
		if err := r.Apply(context.Background(), io.Discard, bytes.NewReader(tb)); err != nil {
			t.Fatal(err)
		}
		app := time.Since(start)
		mbs := func(d time.Duration) float64 { return float64(len(tb)) / 1e6 / d.Seconds() }
		t.Logf("%-18s %-40s ratio %.3f  build %6.1f MB/s  detect %6.2fs  apply %6.1f MB/s",
			b.name, r.Encoder(), float64(blob.Len())/float64(len(tb)), mbs(build), det.Seconds(), mbs(app))
	}
}

// BenchmarkApply: single-stream restore speed on a 4 MB generated tar.
func BenchmarkApply(b *testing.B) {
	tb := genTar(b, 4<<20)
	hdr := []byte{0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255}
	for _, r := range []*Recipe{
		{Format: FormatGzip, enc: encGoFlate, level: 6, header: hdr},
		{Format: FormatGzip, enc: encKPFlate, level: 5, header: hdr},
		{Format: FormatZstd, enc: encKPZstd, level: 2, zopt: zstdOptions{CRC: true}},
	} {
		b.Run(r.Encoder(), func(b *testing.B) {
			b.SetBytes(int64(len(tb)))
			for b.Loop() {
				if err := r.Apply(context.Background(), io.Discard, bytes.NewReader(tb)); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// TestChunkedThroughputReport compares, on a tar of real files compressed
// by compress/gzip at its default level, the sequential restore with the
// chunked one (all cores): wall MB/s and MB per CPU-second, alternating,
// medians of 7. DUPSNAP_RECIPE_BENCH=1 go test -run ChunkedThroughput -v ./proxy/recipe
func TestChunkedThroughputReport(t *testing.T) {
	if os.Getenv("DUPSNAP_RECIPE_BENCH") == "" {
		t.Skip("set DUPSNAP_RECIPE_BENCH=1")
	}
	dir := os.Getenv("DUPSNAP_RECIPE_BENCH_DIR")
	if dir == "" {
		dir = "/usr/lib/x86_64-linux-gnu"
	}
	tb := realTar(t, dir, 24<<20)
	var blob bytes.Buffer
	zw := stdgzip.NewWriter(&blob)
	zw.Write(tb)
	zw.Close()
	d := digest.FromBytes(blob.Bytes())
	start := time.Now()
	r, err := Detect(context.Background(), bytes.NewReader(blob.Bytes()), int64(blob.Len()), d, tarFunc(tb))
	if err != nil || r == nil {
		t.Fatal(r, err)
	}
	t.Logf("tar %.1f MB, blob %.1f MB (%s, %d chunks), detect %v, GOMAXPROCS %d", float64(len(tb))/1e6, float64(blob.Len())/1e6, r.Encoder(), r.Chunks(), time.Since(start), runtime.GOMAXPROCS(0))
	seq := r.Sequential()
	res := map[int][][2]float64{}
	for range 7 {
		for _, rr := range []*Recipe{seq, r} {
			cpu0, t0 := cpuNow(), time.Now()
			if err := rr.Restore(context.Background(), io.Discard, tarFunc(tb), d); err != nil {
				t.Fatal(err)
			}
			wall, cpu := time.Since(t0), cpuNow()-cpu0
			res[rr.Chunks()] = append(res[rr.Chunks()], [2]float64{float64(blob.Len()) / 1e6 / wall.Seconds(), float64(blob.Len()) / 1e6 / cpu.Seconds()})
		}
	}
	for _, n := range []int{1, r.Chunks()} {
		var wall, cpu []float64
		for _, v := range res[n] {
			wall, cpu = append(wall, v[0]), append(cpu, v[1])
		}
		sort.Float64s(wall)
		sort.Float64s(cpu)
		t.Logf("%3d chunks: %.1f MB/s of blob (runs %.1f), %.1f MB of blob per CPU-second", n, wall[len(wall)/2], wall, cpu[len(cpu)/2])
	}
}

func cpuNow() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
