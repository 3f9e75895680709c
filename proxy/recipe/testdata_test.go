package recipe

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"
)

// genTar builds a deterministic tar of about size bytes mixing what layers
// contain: text, incompressible data, zero runs and repeated blocks.
func genTar(t testing.TB, size int) []byte {
	t.Helper()
	rng := rand.New(rand.NewPCG(5, 42))
	words := []string{"lib", "usr", "the", "config", "return", "func", "error", "value", "0x00", "static", "{", "}", "\n", "\t", "package", "import"}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	mtime := time.Unix(1700000000, 0)
	var prev []byte
	for i := 0; buf.Len() < size; i++ {
		n := 1 + rng.IntN(96<<10)
		body := make([]byte, 0, n)
		switch i % 4 {
		case 0:
			for len(body) < n {
				body = append(body, words[rng.IntN(len(words))]...)
				body = append(body, ' ')
			}
			body = body[:n]
		case 1:
			body = body[:n]
			for j := range body {
				body[j] = byte(rng.Uint32())
			}
		case 2:
			body = body[:n] // zeros, like sparse/padded files
		case 3:
			for len(body) < n && len(prev) > 0 {
				body = append(body, prev...)
			}
			body = body[:min(n, len(body))]
		}
		prev = body
		hdr := &tar.Header{Name: fmt.Sprintf("dir%d/file%d", i%7, i), Mode: 0o644, Size: int64(len(body)), ModTime: mtime, Typeflag: tar.TypeReg, Format: tar.FormatPAX}
		if err := tw.WriteHeader(hdr); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(body); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// realTar tars regular files under dir (sorted walk) until about size bytes.
func realTar(t testing.TB, dir string, size int64) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || int64(buf.Len()) >= size {
			return nil
		}
		if !d.Type().IsRegular() {
			return nil
		}
		fi, err := d.Info()
		if err != nil || fi.Size() > size/4 {
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return nil
		}
		hdr, err := tar.FileInfoHeader(fi, "")
		if err != nil {
			return err
		}
		hdr.Name = p
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		_, err = tw.Write(b)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if buf.Len() < 1<<20 {
		t.Skipf("not enough files under %s", dir)
	}
	return buf.Bytes()
}

// goSrcTar is a "real files" tar small enough for unit tests.
func goSrcTar(t testing.TB) []byte {
	return realTar(t, filepath.Join(runtime.GOROOT(), "src", "net"), 2<<20)
}

func tarFunc(b []byte) func() (io.ReadCloser, error) {
	return func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil }
}
