package recipe

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"testing"

	"github.com/google/go-containerregistry/pkg/compression"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/klauspost/compress/zstd"
)

// zstdWriters are the zstd writers of real image builders, as each calls
// klauspost/compress/zstd (read from their sources):
//   - containerd v2 pkg/archive/compression: zstd.NewWriter(dest), tar
//     written into it (Write calls); moby and nerdctl use the same.
//   - BuildKit util/compression: zstd.NewWriter(dest, WithEncoderLevel(l)),
//     l from its level mapping (default SpeedDefault; 0-2 fastest, 7-8
//     better, 9+ best).
//   - containers/image (podman, buildah, skopeo): zstd.NewWriter(dest,
//     WithEncoderLevel(EncoderLevelFromZstd(level))), default level 3.
//   - go-containerregistry (crane, ko, the integration harness): tarball
//     layers with WithCompression(ZStd): zstd.NewWriter(bw,
//     WithEncoderLevel(EncoderLevelFromZstd(level))) fed by io.Copy, i.e.
//     Encoder.ReadFrom, level 1 unless WithCompressionLevel.
func zstdWriters() []builder {
	ggcr := func(name string, opts ...tarball.LayerOption) builder {
		return builder{name, func(t testing.TB, w io.Writer, tar []byte) {
			opts := append([]tarball.LayerOption{tarball.WithCompression(compression.ZStd)}, opts...)
			l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(tar)), nil }, opts...)
			if err != nil {
				t.Fatal(err)
			}
			rc, err := l.Compressed()
			if err != nil {
				t.Fatal(err)
			}
			defer rc.Close()
			if _, err := io.Copy(w, rc); err != nil {
				t.Fatal(err)
			}
		}}
	}
	readFrom := func(name string, opts ...zstd.EOption) builder {
		return builder{name, func(t testing.TB, w io.Writer, tar []byte) {
			zw, err := zstd.NewWriter(w, opts...)
			if err != nil {
				t.Fatal(err)
			}
			// io.Copy from a pipe: Encoder.ReadFrom sees short reads.
			if _, err := io.Copy(zw, &shortReader{b: tar}); err != nil {
				t.Fatal(err)
			}
			if err := zw.Close(); err != nil {
				t.Fatal(err)
			}
		}}
	}
	return []builder{
		zstdBuilder("containerd"),
		zstdBuilder("containerd-8-cpus", zstd.WithEncoderConcurrency(8)),
		zstdBuilder("buildkit-fastest", zstd.WithEncoderLevel(zstd.SpeedFastest)),
		zstdBuilder("buildkit-better", zstd.WithEncoderLevel(zstd.SpeedBetterCompression)),
		zstdBuilder("buildkit-best", zstd.WithEncoderLevel(zstd.SpeedBestCompression)),
		zstdBuilder("containers-image-3", zstd.WithEncoderLevel(zstd.EncoderLevelFromZstd(3))),
		readFrom("readfrom-default"),
		readFrom("readfrom-fastest", zstd.WithEncoderLevel(zstd.SpeedFastest)),
		ggcr("ggcr"),
		ggcr("ggcr-level-3", tarball.WithCompressionLevel(3)),
		ggcr("ggcr-level-9", tarball.WithCompressionLevel(9)),
		zstdBuilder("window-64k", zstd.WithWindowSize(64<<10)),
		zstdBuilder("window-1m-fastest", zstd.WithWindowSize(1<<20), zstd.WithEncoderLevel(zstd.SpeedFastest)),
		zstdBuilder("nocrc", zstd.WithEncoderCRC(false)),
		{"stream-content-size", func(t testing.TB, w io.Writer, tar []byte) {
			zw, _ := zstd.NewWriter(nil)
			zw.ResetContentSize(w, int64(len(tar)))
			writeAll(t, zw, tar)
		}},
	}
}

// shortReader returns at most 32 KiB per Read, like a pipe.
type shortReader struct{ b []byte }

func (r *shortReader) Read(p []byte) (int, error) {
	if len(r.b) == 0 {
		return 0, io.EOF
	}
	n := copy(p[:min(len(p), 32<<10)], r.b)
	r.b = r.b[n:]
	return n, nil
}

// TestZstdBuilders: every builder's zstd layer gets a recipe at sizes around
// the block (64/128 KiB), minimum window (1 KiB) and default window (4/8 MiB)
// boundaries, where klauspost switches between a one-shot frame (content
// size, single segment or a small window) and a streamed one.
func TestZstdBuilders(t *testing.T) {
	sizes := []int{1024, 1536, 10 << 10, 64 << 10, 64<<10 + 512, 128 << 10, 128<<10 + 512, 300 << 10, 4<<20 + 512<<10}
	big := genTar(t, 9<<20)
	for _, size := range sizes {
		tb := tarOfSize(t, big, size)
		for _, b := range zstdWriters() {
			if size > 1<<20 && b.name != "containerd" && b.name != "ggcr" && b.name != "buildkit-fastest" {
				continue // CPU: the large size only for the common writers
			}
			t.Run(fmt.Sprintf("%s/%d", b.name, len(tb)), func(t *testing.T) {
				var blob bytes.Buffer
				b.fn(t, &blob, tb)
				r := mustDetect(t, blob.Bytes(), tb)
				if r == nil {
					t.Fatalf("no recipe for %d-byte blob, frame header % x", blob.Len(), blob.Bytes()[:min(blob.Len(), 14)])
				}
				checkApply(t, r, blob.Bytes(), tb)
			})
		}
	}
}

// tarOfSize returns a valid tar of exactly size bytes (a multiple of 512,
// >= 1024): one file cut from big's bytes, then the two zero end blocks.
func tarOfSize(t testing.TB, big []byte, size int) []byte {
	t.Helper()
	if size == 1024 {
		return make([]byte, 1024) // an empty layer
	}
	body := size - 1024 - 512
	var buf bytes.Buffer
	writeTarFile(t, &buf, "f", big[:body])
	if buf.Len() != size {
		t.Fatalf("tar of %d bytes, want %d", buf.Len(), size)
	}
	return buf.Bytes()
}

func writeTarFile(t testing.TB, w io.Writer, name string, body []byte) {
	t.Helper()
	tw := tar.NewWriter(w)
	if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(body)), Typeflag: tar.TypeReg, Format: tar.FormatUSTAR}); err != nil {
		t.Fatal(err)
	}
	if _, err := tw.Write(body); err != nil {
		t.Fatal(err)
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestZstdEncodeAllRefused: EncodeAll of more than one block writes a
// single-segment frame that streaming does not reproduce (no builder found
// doing it); Detect must say so cleanly and the blob stays retained.
// Smaller inputs are one block, where EncodeAll and streaming agree.
func TestZstdEncodeAllRefused(t *testing.T) {
	big := genTar(t, 1<<20)
	for _, size := range []int{10 << 10, 300 << 10} {
		tb := tarOfSize(t, big, size)
		zw, err := zstd.NewWriter(nil)
		if err != nil {
			t.Fatal(err)
		}
		blob := zw.EncodeAll(tb, nil)
		r := mustDetect(t, blob, tb)
		switch {
		case size <= 128<<10 && r == nil:
			t.Errorf("%d: no recipe for a one-block EncodeAll frame", size)
		case size > 128<<10 && r != nil:
			t.Errorf("%d: recipe %s for a multi-block EncodeAll frame", size, r.Encoder())
		}
		if r != nil {
			checkApply(t, r, blob, tb)
		}
	}
}
