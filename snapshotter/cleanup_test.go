package snapshotter

import (
	"archive/tar"
	"bytes"
	"context"
	"os"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/dupsnap/dupsnap/pkg/layout"
)

func tarOf(t *testing.T, files map[string]string) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for name, body := range files {
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(body)), Typeflag: tar.TypeReg}); err != nil {
			t.Fatal(err)
		}
		tw.Write([]byte(body))
	}
	tw.Close()
	return buf.Bytes()
}

func newTestSnapshotter(t *testing.T) *Snapshotter {
	t.Helper()
	s, err := New(context.Background(), Config{Root: t.TempDir(), NoSync: true, GCGrace: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// A manifest imported by hand (no snapshot refers to it) survives Cleanup
// within the grace period, its diffID index entry with it; after the grace
// both go.
func TestCleanupKeepsYoungUnreferencedLayer(t *testing.T) {
	ctx := context.Background()
	s := newTestSnapshotter(t)
	m, err := s.Layers().Import(ctx, bytes.NewReader(tarOf(t, map[string]string{"a": "hello"})), layout.IngestOptions{})
	if err != nil {
		t.Fatal(err)
	}
	real := digest.FromString("compressed-or-real-diffid")
	if err := s.recordDiffID(real, m.DiffID); err != nil {
		t.Fatal(err)
	}
	if k, ok := s.lookupLayer(real); !ok || k != m.DiffID {
		t.Fatalf("lookupLayer(real) = %v %v, want %v", k, ok, m.DiffID)
	}
	if k, ok := s.lookupLayer(m.DiffID); !ok || k != m.DiffID {
		t.Fatalf("lookupLayer(key) = %v %v", k, ok)
	}
	if err := s.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	if !s.Layers().Has(m.DiffID) {
		t.Fatal("Cleanup deleted a manifest younger than the grace period")
	}
	if _, ok := s.lookupLayer(real); !ok {
		t.Fatal("Cleanup dropped the diffID index entry of a young layer")
	}

	s.cfg.GCGrace = time.Nanosecond
	old := time.Now().Add(-time.Minute)
	if err := os.Chtimes(s.Layers().Dir()+"/sha256/"+m.DiffID.Encoded(), old, old); err != nil {
		t.Fatal(err)
	}
	if err := s.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	if s.Layers().Has(m.DiffID) {
		t.Fatal("Cleanup kept an old unreferenced manifest")
	}
	if _, ok := s.lookupLayer(real); ok {
		t.Fatal("diffID index still resolves a deleted layer")
	}
	if _, err := os.Stat(s.diffIDPath(real)); !os.IsNotExist(err) {
		t.Fatalf("stale diffID index entry left: %v", err)
	}
}
