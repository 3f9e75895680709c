package recipe

import (
	"bytes"
	stdgzip "compress/gzip"
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"testing"
	"time"

	kpgzip "github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
)

// builder compresses a tar the way some image builder does.
type builder struct {
	name string
	fn   func(t testing.TB, w io.Writer, tar []byte)
}

func gzipBuilder(name string, level int, kp bool, hdr func(*stdgzip.Header)) builder {
	return builder{name, func(t testing.TB, w io.Writer, tar []byte) {
		var zw io.WriteCloser
		var err error
		if kp {
			var k *kpgzip.Writer
			k, err = kpgzip.NewWriterLevel(w, level)
			if err == nil && hdr != nil {
				var h stdgzip.Header
				hdr(&h)
				k.Header = kpgzip.Header{Name: h.Name, Comment: h.Comment, Extra: h.Extra, ModTime: h.ModTime, OS: h.OS}
			}
			zw = k
		} else {
			var s *stdgzip.Writer
			s, err = stdgzip.NewWriterLevel(w, level)
			if err == nil && hdr != nil {
				hdr(&s.Header)
			}
			zw = s
		}
		if err != nil {
			t.Fatal(err)
		}
		writeAll(t, zw, tar)
	}}
}

func zstdBuilder(name string, opts ...zstd.EOption) builder {
	return builder{name, func(t testing.TB, w io.Writer, tar []byte) {
		zw, err := zstd.NewWriter(w, opts...)
		if err != nil {
			t.Fatal(err)
		}
		writeAll(t, zw, tar)
	}}
}

// writeAll writes in uneven pieces, as io.Copy from a tar writer would.
func writeAll(t testing.TB, w io.WriteCloser, b []byte) {
	t.Helper()
	for i, n := 0, 0; i < len(b); i += n {
		n = min(len(b)-i, 1000+(i%(100<<10)))
		if _, err := w.Write(b[i : i+n]); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
}

// builders covers what real image builders produce.
func builders() []builder {
	named := func(h *stdgzip.Header) { h.Name = "layer.tar"; h.ModTime = time.Unix(1600000000, 0); h.Comment = "c" }
	extra := func(h *stdgzip.Header) { h.Extra = []byte("XY\x04\x00abcd"); h.OS = 3 }
	return []builder{
		gzipBuilder("go-default", stdgzip.DefaultCompression, false, nil),
		gzipBuilder("go-bestspeed", stdgzip.BestSpeed, false, nil),
		gzipBuilder("go-best", stdgzip.BestCompression, false, nil),
		gzipBuilder("go-3-named", 3, false, named),
		gzipBuilder("go-6-extra-os3", 6, false, extra),
		gzipBuilder("kp-default", kpgzip.DefaultCompression, true, nil),
		gzipBuilder("kp-bestspeed", kpgzip.BestSpeed, true, nil),
		gzipBuilder("kp-best", kpgzip.BestCompression, true, nil),
		gzipBuilder("kp-7-named", 7, true, named),
		gzipBuilder("go-store", stdgzip.NoCompression, false, nil),
		gzipBuilder("kp-store", kpgzip.NoCompression, true, nil),
		zstdBuilder("zstd-containerd"), // zstd.NewWriter(dest), GOMAXPROCS concurrency
		zstdBuilder("zstd-fastest", zstd.WithEncoderLevel(zstd.SpeedFastest)),
		zstdBuilder("zstd-better", zstd.WithEncoderLevel(zstd.SpeedBetterCompression), zstd.WithEncoderConcurrency(1)),
		zstdBuilder("zstd-best", zstd.WithEncoderLevel(zstd.SpeedBestCompression)),
		zstdBuilder("zstd-ggcr-3-nocrc", zstd.WithEncoderLevel(zstd.EncoderLevelFromZstd(3)), zstd.WithEncoderCRC(false)),
		zstdBuilder("zstd-window-1m", zstd.WithWindowSize(1<<20)),
		zstdBuilder("zstd-concurrency-4", zstd.WithEncoderConcurrency(4)),
	}
}

func TestDetectApplyRoundTrip(t *testing.T) {
	ctx := context.Background()
	tars := map[string][]byte{"gen": genTar(t, 768<<10), "gosrc": goSrcTar(t)}
	for tname, tb := range tars {
		for _, b := range builders() {
			if tname == "gosrc" && b.name != "go-default" && b.name != "kp-default" && b.name != "zstd-containerd" {
				continue // keep CPU low: the generated tar covers the rest
			}
			t.Run(tname+"/"+b.name, func(t *testing.T) {
				var blob bytes.Buffer
				b.fn(t, &blob, tb)
				r := mustDetect(t, blob.Bytes(), tb)
				if r == nil {
					t.Fatalf("no recipe found")
				}
				t.Logf("recipe %s", r.Encoder())
				checkApply(t, r, blob.Bytes(), tb)
				m, err := r.Marshal()
				if err != nil {
					t.Fatal(err)
				}
				r2, err := Unmarshal(m)
				if err != nil {
					t.Fatal(err)
				}
				checkApply(t, r2, blob.Bytes(), tb)
				if err := r2.ApplyVerified(ctx, io.Discard, bytes.NewReader(tb), digest.FromBytes(blob.Bytes())); err != nil {
					t.Fatal(err)
				}
				if err := r2.ApplyVerified(ctx, io.Discard, bytes.NewReader(tb[1:]), digest.FromBytes(blob.Bytes())); err == nil {
					t.Fatal("ApplyVerified accepted the wrong tar")
				}
			})
		}
	}
}

func mustDetect(t testing.TB, blob, tb []byte) *Recipe {
	t.Helper()
	r, err := Detect(context.Background(), bytes.NewReader(blob), int64(len(blob)), digest.FromBytes(blob), tarFunc(tb))
	if err != nil {
		t.Fatalf("Detect: %v", err)
	}
	return r
}

func checkApply(t testing.TB, r *Recipe, blob, tb []byte) {
	t.Helper()
	var out bytes.Buffer
	if err := r.Apply(context.Background(), &out, bytes.NewReader(tb)); err != nil {
		t.Fatalf("Apply: %v", err)
	}
	if !bytes.Equal(out.Bytes(), blob) {
		t.Fatalf("Apply output differs: %d vs %d bytes", out.Len(), len(blob))
	}
}

func TestDetectUnknown(t *testing.T) {
	tb := genTar(t, 512<<10)
	member := func(b []byte) []byte {
		var buf bytes.Buffer
		gzipBuilder("", 6, false, nil).fn(t, &buf, b)
		return buf.Bytes()
	}
	cases := map[string][]byte{
		"multi-member":     append(member(tb[:len(tb)/2]), member(tb[len(tb)/2:])...),
		"trailing-garbage": append(member(tb), 0, 0, 0, 0),
		"plain-tar":        tb,
		"empty":            {},
	}
	if p, err := exec.LookPath("gzip"); err == nil {
		cases["gnu-gzip-9"] = runTool(t, p, tb, "-9", "-c", "-n")
		cases["gnu-gzip-6"] = runTool(t, p, tb, "-c", "-n")
	}
	if p, err := exec.LookPath("zstd"); err == nil {
		cases["zstd-cli"] = runTool(t, p, tb, "-c", "-q", "-3")
	}
	for name, blob := range cases {
		t.Run(name, func(t *testing.T) {
			if r := mustDetect(t, blob, tb); r != nil {
				t.Fatalf("unexpected recipe %s", r.Encoder())
			}
		})
	}
}

func runTool(t testing.TB, tool string, in []byte, args ...string) []byte {
	cmd := exec.Command(tool, args...)
	cmd.Stdin = bytes.NewReader(in)
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s: %v", tool, err)
	}
	return out
}

func TestDetectWrongTar(t *testing.T) {
	tb := genTar(t, 512<<10)
	var blob bytes.Buffer
	gzipBuilder("", 6, false, nil).fn(t, &blob, tb)
	other := bytes.Clone(tb)
	other[len(other)-5000] ^= 1 // differs only near the end: the full run must catch it
	if r := mustDetect(t, blob.Bytes(), other); r != nil {
		t.Fatalf("recipe for the wrong tar: %s", r.Encoder())
	}
}

func TestDetectCancel(t *testing.T) {
	tb := genTar(t, 512<<10)
	var blob bytes.Buffer
	gzipBuilder("", 6, false, nil).fn(t, &blob, tb)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	r, err := Detect(ctx, bytes.NewReader(blob.Bytes()), int64(blob.Len()), digest.FromBytes(blob.Bytes()), tarFunc(tb))
	if !errors.Is(err, context.Canceled) || r != nil {
		t.Fatalf("got %v, %v; want context.Canceled", r, err)
	}
	err = (&Recipe{Format: FormatGzip, enc: encGoFlate, level: 6, header: blob.Bytes()[:10]}).Apply(ctx, io.Discard, bytes.NewReader(tb))
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Apply: got %v; want context.Canceled", err)
	}
}

func TestUnmarshalRejectsCorruption(t *testing.T) {
	tb := genTar(t, 64<<10)
	var blob bytes.Buffer
	gzipBuilder("", 6, false, func(h *stdgzip.Header) { h.Name = "x" }).fn(t, &blob, tb)
	r := mustDetect(t, blob.Bytes(), tb)
	if r == nil {
		t.Fatal("no recipe")
	}
	m, err := r.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	for i := range m {
		c := bytes.Clone(m)
		c[i] ^= 0x10
		if _, err := Unmarshal(c); err == nil {
			t.Fatalf("flipped byte %d accepted", i)
		}
	}
	for n := 0; n < len(m); n++ {
		if _, err := Unmarshal(m[:n]); err == nil {
			t.Fatalf("truncation to %d accepted", n)
		}
	}
	if _, err := Unmarshal(nil); err == nil {
		t.Fatal("nil accepted")
	}
}

// Tiny and empty tars take the "whole tar fits in the prefix" path.
func TestDetectTiny(t *testing.T) {
	for _, tb := range [][]byte{{}, genTar(t, 1)} {
		for _, b := range []builder{gzipBuilder("go", 6, false, nil), gzipBuilder("kp", 9, true, nil), zstdBuilder("zstd")} {
			var blob bytes.Buffer
			b.fn(t, &blob, tb)
			r := mustDetect(t, blob.Bytes(), tb)
			if r == nil {
				t.Fatalf("%s on %d-byte tar: no recipe", b.name, len(tb))
			}
			checkApply(t, r, blob.Bytes(), tb)
		}
	}
}
