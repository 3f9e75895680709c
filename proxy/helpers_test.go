package proxy_test

import (
	"bytes"
	"compress/gzip"
	"os"

	"context"
	"crypto/rand"
	"fmt"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	"github.com/sirupsen/logrus"
	"io"
	"math/big"
	"net/http"
	"testing"
	"time"

	"github.com/dupsnap/dupsnap/proxy/proxytest"
)

// files returns n pseudo-random files of roughly size bytes under dir; the
// same seed gives the same contents (shared files across images).
func files(seed string, dir string, n, size int) []proxytest.File {
	out := []proxytest.File{{Name: dir, Dir: true}}
	for i := 0; i < n; i++ {
		body := make([]byte, size+i*37)
		fill(body, fmt.Sprintf("%s-%d", seed, i))
		out = append(out, proxytest.File{Name: fmt.Sprintf("%s/f%03d", dir, i), Body: body})
	}
	return out
}

// fill makes half-compressible deterministic content (text-like runs mixed
// with noise) so compression and dedup both matter.
func fill(b []byte, seed string) {
	x := uint64(1469598103934665603)
	for _, c := range []byte(seed) {
		x = (x ^ uint64(c)) * 1099511628211
	}
	for i := range b {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		if (i/64)%2 == 0 {
			b[i] = "abcdefgh ijklmnop\n"[x%18]
		} else {
			b[i] = byte(x)
		}
	}
}

func randBytes(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}

var _ = big.NewInt

func get(t *testing.T, url string, hdr map[string]string) (*http.Response, []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, b
}

func do(t *testing.T, method, url string, body []byte) (*http.Response, []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, method, url, bytes.NewReader(body))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, b
}

// verifyImage reads every blob of a pulled image and checks it against the
// digests the image names (ggcr's validate assumes gzip layers).
func verifyImage(t *testing.T, ri v1.Image, img *proxytest.Image) {
	t.Helper()
	raw, err := ri.RawConfigFile()
	if err != nil || digest.FromBytes(raw) != img.Config.Digest {
		t.Fatalf("config: %v (%s)", err, digest.FromBytes(raw))
	}
	cf, err := ri.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	layers, err := ri.Layers()
	if err != nil {
		t.Fatal(err)
	}
	if len(layers) != len(img.Layers) || len(cf.RootFS.DiffIDs) != len(layers) {
		t.Fatalf("%d layers, want %d", len(layers), len(img.Layers))
	}
	for i, l := range layers {
		rc, err := l.Compressed()
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(rc)
		rc.Close()
		if err != nil {
			t.Fatalf("layer %d: %v", i, err)
		}
		if digest.FromBytes(b) != img.Layers[i].Digest || !bytes.Equal(b, img.Blobs[img.Layers[i].Digest]) {
			t.Fatalf("layer %d: blob differs from upstream", i)
		}
		tarb := decompress(t, b)
		if digest.FromBytes(tarb).String() != cf.RootFS.DiffIDs[i].String() {
			t.Fatalf("layer %d: diffID mismatch", i)
		}
	}
}

func decompress(t *testing.T, b []byte) []byte {
	t.Helper()
	var r io.Reader = bytes.NewReader(b)
	switch {
	case len(b) > 2 && b[0] == 0x1f && b[1] == 0x8b:
		zr, err := gzip.NewReader(r)
		if err != nil {
			t.Fatal(err)
		}
		r = zr
	case len(b) > 4 && bytes.Equal(b[:4], []byte{0x28, 0xb5, 0x2f, 0xfd}):
		zr, err := zstd.NewReader(r)
		if err != nil {
			t.Fatal(err)
		}
		defer zr.Close()
		r = zr
	}
	out, err := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func TestMain(m *testing.M) {
	logrus.SetLevel(logrus.WarnLevel)
	os.Exit(m.Run())
}
