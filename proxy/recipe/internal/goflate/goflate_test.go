package goflate

import (
	"bytes"
	stdflate "compress/flate"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"testing"
)

// testData mixes text, incompressible bytes, zero runs and repeats, plus
// real source files, so that blocks end in matches and literals, stored
// blocks occur and the window slides many times.
func testData(t testing.TB, size int) []byte {
	t.Helper()
	rng := rand.New(rand.NewPCG(7, 9))
	words := []string{"lib", "usr", "the", "config", "return", "func", "error", "\n", "\t", "{", "}"}
	var b []byte
	_ = filepath.WalkDir(filepath.Join(runtime.GOROOT(), "src", "compress"), func(p string, d fs.DirEntry, err error) error {
		if err != nil || len(b) >= size/2 || !d.Type().IsRegular() {
			return nil
		}
		if c, err := os.ReadFile(p); err == nil {
			b = append(b, c...)
		}
		return nil
	})
	for i := 0; len(b) < size; i++ {
		n := 1 + rng.IntN(80<<10)
		switch i % 4 {
		case 0:
			for j := 0; j < n; j += 4 {
				b = append(b, words[rng.IntN(len(words))]...)
			}
		case 1:
			for j := 0; j < n; j++ {
				b = append(b, byte(rng.Uint32()))
			}
		case 2:
			b = append(b, make([]byte, n)...)
		case 3:
			if len(b) > n {
				b = append(b, b[len(b)-n:]...)
			}
		}
	}
	return b[:size]
}

func stdDeflate(t testing.TB, level int, data []byte) []byte {
	var out bytes.Buffer
	w, err := stdflate.NewWriter(&out, level)
	if err != nil {
		t.Fatal(err)
	}
	for p := data; len(p) > 0; {
		n := min(len(p), 64<<10)
		w.Write(p[:n])
		p = p[n:]
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return out.Bytes()
}

// join appends a chunk whose first byte starts at bit startBit%8.
func join(out, chunk []byte, startBit int64) []byte {
	if startBit&7 != 0 && len(chunk) > 0 {
		out[len(out)-1] |= chunk[0]
		chunk = chunk[1:]
	}
	return append(out, chunk...)
}

func chunked(t testing.TB, level int, data []byte, cps []Checkpoint) []byte {
	t.Helper()
	var out []byte
	for i, c := range cps {
		var to *Checkpoint
		end := len(data)
		if i+1 < len(cps) {
			to = &cps[i+1]
			end = min(len(data), int(to.Pos)+2*windowSize)
		}
		var buf bytes.Buffer
		bit, err := Resume(&buf, level, c, to, data[c.Base:end])
		if err != nil {
			t.Fatalf("chunk %d: %v", i, err)
		}
		if to != nil && bit != to.Bit {
			t.Fatalf("chunk %d ended at bit %d, want %d", i, bit, to.Bit)
		}
		if int64(buf.Len()) != (bit+7)/8-c.Bit/8 {
			t.Fatalf("chunk %d: %d bytes for bits %d..%d", i, buf.Len(), c.Bit, bit)
		}
		out = join(out, buf.Bytes(), c.Bit)
	}
	return out
}

func TestCaptureResumeMatchesStdlib(t *testing.T) {
	data := testData(t, 3<<20)
	for level := 4; level <= 9; level++ {
		want := stdDeflate(t, level, data)
		var got bytes.Buffer
		c, err := NewCapture(&got, level, 256<<10)
		if err != nil {
			t.Fatal(err)
		}
		for p := data; len(p) > 0; {
			n := min(len(p), 1000+len(p)%7777) // odd write sizes: output must not depend on them
			c.Write(p[:n])
			p = p[n:]
		}
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got.Bytes(), want) {
			t.Fatalf("level %d: capture output differs from compress/flate (%d vs %d bytes)", level, got.Len(), len(want))
		}
		cps := c.Checkpoints()
		if len(cps) < 5 {
			t.Fatalf("level %d: only %d checkpoints", level, len(cps))
		}
		// Start from the beginning too: a zero checkpoint is the fresh state.
		all := append([]Checkpoint{{Length: minMatchLength - 1}}, cps...)
		if out := chunked(t, level, data, all); !bytes.Equal(out, want) {
			t.Fatalf("level %d: chunked output differs (%d vs %d bytes)", level, len(out), len(want))
		}
	}
}

func TestResumeRejectsCorruptCheckpoint(t *testing.T) {
	data := testData(t, 1<<20)
	c, _ := NewCapture(&bytes.Buffer{}, 6, 128<<10)
	c.Write(data)
	c.Close()
	cps := c.Checkpoints()
	if len(cps) < 3 {
		t.Fatalf("%d checkpoints", len(cps))
	}
	from, to := cps[0], cps[1]
	seg := data[from.Base:min(len(data), int(to.Pos)+2*windowSize)]
	for name, mut := range map[string]func(*Checkpoint){
		"bit":    func(c *Checkpoint) { c.Bit += 16 }, // (+3 may be absorbed by a stored block's padding: the recipe's chunk CRCs catch that)
		"length": func(c *Checkpoint) { c.Length = 40; c.ByteAvail = true },
		"index":  func(c *Checkpoint) { c.Index += 100 },
		"base":   func(c *Checkpoint) { c.Base += 7 },
		"pos":    func(c *Checkpoint) { c.Pos = c.Base + int64(c.Index) + 1 },
	} {
		f := from
		mut(&f)
		if _, err := Resume(&bytes.Buffer{}, 6, f, &to, seg); err == nil {
			t.Errorf("%s: corrupted checkpoint resumed without error", name)
		}
	}
	bad := to
	bad.Bit++
	if _, err := Resume(&bytes.Buffer{}, 6, from, &bad, seg); err == nil {
		t.Error("wrong end checkpoint not detected")
	}
}

func TestMatchLen(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 10000; i++ {
		n := 1 + rng.IntN(300)
		a := make([]byte, n)
		b := make([]byte, n)
		k := rng.IntN(n + 1)
		for j := range a {
			a[j] = byte(rng.IntN(4))
			b[j] = a[j]
		}
		if k < n {
			b[k]++
		}
		max := 1 + rng.IntN(n)
		want := max
		for j := 0; j < max; j++ {
			if a[j] != b[j] {
				want = j
				break
			}
		}
		if got := matchLen(a, b, max); got != want {
			t.Fatalf("matchLen = %d, want %d", got, want)
		}
	}
}

// Blocks longer than the window (long zero runs: up to 4 MiB of input per
// block, the window slides inside them), tiny inputs and a checkpoint at
// every block boundary.
func TestCaptureResumeEdgeCases(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	long := make([]byte, 9<<20)
	for i := 5 << 20; i < 6<<20; i++ {
		long[i] = byte(rng.Uint32())
	}
	for i := 7 << 20; i < len(long); i++ {
		long[i] = "abcab"[i%5]
	}
	cases := map[string]struct {
		data  []byte
		every int64
	}{
		"long runs":   {long, 1 << 20},
		"every block": {testData(t, 1<<20), 1},
		"tiny":        {[]byte("hello"), 1},
		"empty":       {nil, 1},
		"one window":  {testData(t, 2*windowSize+100), 1},
	}
	for name, c := range cases {
		for _, level := range []int{4, 6, 9} {
			want := stdDeflate(t, level, c.data)
			var got bytes.Buffer
			cp, _ := NewCapture(&got, level, c.every)
			cp.Write(c.data)
			if err := cp.Close(); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got.Bytes(), want) {
				t.Fatalf("%s level %d: capture output differs", name, level)
			}
			all := append([]Checkpoint{{Length: minMatchLength - 1}}, cp.Checkpoints()...)
			if out := chunked(t, level, c.data, all); !bytes.Equal(out, want) {
				t.Fatalf("%s level %d: chunked output differs (%d checkpoints)", name, level, len(all)-1)
			}
		}
	}
}
