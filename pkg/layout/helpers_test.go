package layout

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/dupsnap/dupsnap/pkg/cas"
)

// memCAS is an in-memory object store for tests of the tar path alone (the
// real store is exercised by store_test.go and the crash test).
type memCAS struct {
	mu   sync.Mutex
	objs map[digest.Digest][]byte
}

func newMemCAS() *memCAS { return &memCAS{objs: map[digest.Digest][]byte{}} }

func (m *memCAS) Put(ctx context.Context, r io.Reader) (digest.Digest, int64, error) {
	b, err := io.ReadAll(r)
	if err != nil {
		return "", 0, err
	}
	d := digest.SHA256.FromBytes(b)
	m.mu.Lock()
	m.objs[d] = b
	m.mu.Unlock()
	return d, int64(len(b)), nil
}

func (m *memCAS) Open(d digest.Digest) (io.ReadCloser, error) {
	m.mu.Lock()
	b, ok := m.objs[d]
	m.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("%s: %w", d, cas.ErrNotFound)
	}
	return io.NopCloser(bytes.NewReader(b)), nil
}

func sha(b []byte) digest.Digest { return digest.SHA256.FromBytes(b) }

func hexSum(b []byte) string { s := sha256.Sum256(b); return hex.EncodeToString(s[:]) }

func gz(t testing.TB, b []byte) []byte {
	var buf bytes.Buffer
	w := gzip.NewWriter(&buf)
	w.Write(b)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func zst(t testing.TB, b []byte) []byte {
	w, err := zstd.NewWriter(nil, zstd.WithEncoderConcurrency(1))
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	return w.EncodeAll(b, nil)
}

var encodings = []struct {
	name string
	enc  func(testing.TB, []byte) []byte
}{
	{"plain", func(_ testing.TB, b []byte) []byte { return b }},
	{"gzip", gz},
	{"zstd", zst},
}

// run runs a command with a deadline; output goes to a buffer, never to
// the test's own stdout.
func run(t testing.TB, dir string, name string, args ...string) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, errb.String())
	}
	return out.Bytes()
}

// roundTrip ingests layer into a memCAS, checks the manifest encoding
// round-trips and that the export is the uncompressed tar byte for byte.
func roundTrip(t testing.TB, layer, plain []byte) *Manifest {
	t.Helper()
	ctx := context.Background()
	mc := newMemCAS()
	m, err := ingest(ctx, mc, bytes.NewReader(layer), IngestOptions{})
	if err != nil {
		t.Fatalf("ingest: %v", err)
	}
	if m.DiffID != sha(plain) || m.Size != int64(len(plain)) {
		t.Fatalf("diffID %s size %d, want %s %d", m.DiffID, m.Size, sha(plain), len(plain))
	}
	enc, err := m.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	m2, err := Unmarshal(enc)
	if err != nil {
		t.Fatalf("unmarshal: %v", err)
	}
	var out bytes.Buffer
	if err := Export(ctx, mc, m2, &out); err != nil {
		t.Fatalf("export: %v", err)
	}
	if !bytes.Equal(out.Bytes(), plain) {
		t.Fatalf("export differs: %d bytes vs %d, first difference at %d", out.Len(), len(plain), firstDiff(out.Bytes(), plain))
	}
	return m2
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

func writeFile(t testing.TB, p string, data []byte, mode os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, data, mode); err != nil {
		t.Fatal(err)
	}
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func mknod(t testing.TB, p string, mode uint32, major, minor uint32) {
	t.Helper()
	must(t, unix.Mknod(p, mode, int(unix.Mkdev(major, minor))))
}

// pseudoRandom returns deterministic incompressible-ish bytes.
func pseudoRandom(seed, n int) []byte {
	b := make([]byte, n)
	x := uint64(seed)*0x9E3779B97F4A7C15 + 1
	for i := range b {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		b[i] = byte(x)
	}
	return b
}

func entryByPath(m *Manifest, p string) *Entry {
	for i := range m.Entries {
		if m.Entries[i].Path == p && !m.Entries[i].Whiteout && !m.Entries[i].Opaque {
			return &m.Entries[i]
		}
	}
	return nil
}

func ioPipe() (*io.PipeReader, *io.PipeWriter) { return io.Pipe() }
