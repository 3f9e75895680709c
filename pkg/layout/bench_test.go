package layout

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"math/rand"
	"sync"
	"testing"
	"time"

	"github.com/dupsnap/dupsnap/pkg/cas"
)

// benchLayer is a ~64 MiB uncompressed layer with a realistic size mix:
// many small files, some medium, a few large (what an image layer looks
// like: ~70% of files under 16 KiB, most bytes in files over 1 MiB).
var benchLayer = sync.OnceValue(func() []byte {
	rng := rand.New(rand.NewSource(42))
	var ents []tarEnt
	total := 0
	for i := 0; total < 64<<20; i++ {
		var size int
		switch r := rng.Intn(100); {
		case r < 70:
			size = rng.Intn(16 << 10)
		case r < 95:
			size = 16<<10 + rng.Intn(512<<10)
		default:
			size = 1<<20 + rng.Intn(6<<20)
		}
		ents = append(ents, file(fmt.Sprintf("usr/lib/pkg%d/file%d", i%50, i), string(pseudoRandom(i, size))))
		total += size
	}
	return mkTar(&testing.T{}, ents...)
})

func BenchmarkSHA256(b *testing.B) {
	layer := benchLayer()
	b.SetBytes(int64(len(layer)))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		sha256.Sum256(layer)
	}
}

// BenchmarkIngest ingests the layer into a fresh CAS (NoSync: the number is
// the ingest path, not the disk) and reports its rate against sha256 over
// the same bytes, measured in the same run.
func BenchmarkIngest(b *testing.B) {
	layer := benchLayer()
	shaStart := time.Now()
	sha256.Sum256(layer)
	shaRate := float64(len(layer)) / time.Since(shaStart).Seconds()
	ctx := context.Background()
	b.SetBytes(int64(len(layer)))
	b.ResetTimer()
	var elapsed time.Duration
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		c, err := cas.Open(b.TempDir(), cas.Options{NoSync: true})
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		t0 := time.Now()
		batch := c.NewBatch()
		if _, err := Ingest(ctx, batch, bytes.NewReader(layer), IngestOptions{}); err != nil {
			b.Fatal(err)
		}
		if err := batch.Commit(ctx); err != nil {
			b.Fatal(err)
		}
		elapsed += time.Since(t0)
		b.StopTimer()
		c.Close()
		b.StartTimer()
	}
	rate := float64(len(layer)) * float64(b.N) / elapsed.Seconds()
	b.ReportMetric(rate/shaRate, "x-sha256")
}

// BenchmarkExport rebuilds the layer from a warm store into io.Discard.
func BenchmarkExport(b *testing.B) {
	layer := benchLayer()
	ctx := context.Background()
	c, err := cas.Open(b.TempDir(), cas.Options{NoSync: true})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	batch := c.NewBatch()
	m, err := Ingest(ctx, batch, bytes.NewReader(layer), IngestOptions{})
	if err != nil {
		b.Fatal(err)
	}
	if err := batch.Commit(ctx); err != nil {
		b.Fatal(err)
	}
	if err := Export(ctx, c, m, io.Discard); err != nil { // warm the page cache
		b.Fatal(err)
	}
	b.SetBytes(m.Size)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := Export(ctx, c, m, io.Discard); err != nil {
			b.Fatal(err)
		}
	}
}
