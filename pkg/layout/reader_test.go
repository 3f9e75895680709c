package layout

import (
	"bytes"
	"context"
	"errors"
	"io"
	"testing"
)

// chopWriterTo is a source that writes its bytes in a fixed cycle of
// sizes from one reused buffer, and scribbles over that buffer as soon as
// each Write returns: a reader that kept a slice past Write would see
// garbage (and the diffID or an export would differ).
type chopWriterTo struct {
	b     []byte
	sizes []int
	err   error // returned after all bytes, if set
}

// Read serves bufio's first fill (compression detection peeks).
func (c *chopWriterTo) Read(p []byte) (int, error) {
	if len(c.b) == 0 {
		if c.err != nil {
			return 0, c.err
		}
		return 0, io.EOF
	}
	n := copy(p, c.b)
	c.b = c.b[n:]
	return n, nil
}

func (c *chopWriterTo) WriteTo(w io.Writer) (int64, error) {
	buf := make([]byte, 8<<20)
	var total int64
	for i := 0; len(c.b) > 0; i++ {
		k := min(c.sizes[i%len(c.sizes)], len(c.b))
		copy(buf, c.b[:k])
		n, err := w.Write(buf[:k])
		total += int64(n)
		for j := range buf[:k] {
			buf[j] = 0xAA
		}
		if err != nil {
			return total, err
		}
		c.b = c.b[k:]
	}
	return total, c.err
}

// onlyRead hides a source's WriteTo: the copying producer path.
type onlyRead struct{ r io.Reader }

func (o onlyRead) Read(p []byte) (int, error) { return o.r.Read(p) }

func readerTestLayer(t *testing.T) []byte {
	return mkTar(t,
		file("small", "x"),
		file("big", string(pseudoRandom(1, 3<<20+17))),
		file("mid", string(pseudoRandom(2, 300<<10))),
		file("exact", string(pseudoRandom(3, 1<<20))),
		file("tail", "y"))
}

func TestIngestSourceWriteSizes(t *testing.T) {
	layer := readerTestLayer(t)
	for name, sizes := range map[string][]int{
		"tiny":  {1, 7, 511},
		"mixed": {1, lendMin - 1, lendMin, 700 << 10, 3, 3 << 20, 100},
		"big":   {4 << 20},
	} {
		t.Run(name, func(t *testing.T) {
			src := &chopWriterTo{b: layer, sizes: sizes}
			mc := newMemCAS()
			// After its first fill, the bufio.Reader's WriteTo hands
			// through to src.WriteTo.
			m, err := ingest(context.Background(), mc, src, IngestOptions{})
			must(t, err)
			if m.DiffID != sha(layer) || m.Size != int64(len(layer)) {
				t.Fatalf("diffID %s size %d, want %s %d", m.DiffID, m.Size, sha(layer), len(layer))
			}
			var out bytes.Buffer
			must(t, Export(context.Background(), mc, m, &out))
			if !bytes.Equal(out.Bytes(), layer) {
				t.Fatalf("export differs at %d", firstDiff(out.Bytes(), layer))
			}
		})
	}
	t.Run("copying-path", func(t *testing.T) {
		roundTripReader(t, onlyRead{bytes.NewReader(layer)}, layer)
	})
	t.Run("gzip", func(t *testing.T) { roundTrip(t, gz(t, layer), layer) })
	t.Run("zstd", func(t *testing.T) { roundTrip(t, zst(t, layer), layer) })
}

func roundTripReader(t *testing.T, r io.Reader, layer []byte) {
	t.Helper()
	mc := newMemCAS()
	m, err := ingest(context.Background(), mc, r, IngestOptions{})
	must(t, err)
	var out bytes.Buffer
	must(t, Export(context.Background(), mc, m, &out))
	if m.DiffID != sha(layer) || !bytes.Equal(out.Bytes(), layer) {
		t.Fatal("round trip differs")
	}
}

func TestIngestSourceErrors(t *testing.T) {
	layer := readerTestLayer(t)
	boom := errors.New("boom")
	// The source fails after a prefix: the error surfaces (as an invalid layer).
	src := &chopWriterTo{b: layer[:2<<20], sizes: []int{1 << 20}, err: boom}
	_, err := ingest(context.Background(), newMemCAS(), src, IngestOptions{})
	if !errors.Is(err, ErrInvalidLayer) && !errors.Is(err, boom) {
		t.Fatalf("source error: got %v", err)
	}
	// Over MaxSize through the lending path (one huge write) and the
	// copying one (small writes).
	for _, sizes := range [][]int{{8 << 20}, {1000}} {
		src := &chopWriterTo{b: layer, sizes: sizes}
		_, err := ingest(context.Background(), newMemCAS(), src, IngestOptions{MaxSize: 1 << 20})
		if !errors.Is(err, ErrInvalidLayer) {
			t.Fatalf("sizes %v over MaxSize: got %v, want ErrInvalidLayer", sizes, err)
		}
	}
}
