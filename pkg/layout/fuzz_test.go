package layout

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

var fuzzOpts = IngestOptions{MaxEntries: 2000, MaxFileSize: 4 << 20, MaxHeaderLen: 64 << 10, MaxSize: 16 << 20}

// FuzzIngest: any input is either refused or round-trips exactly, and its
// manifest encodes, decodes and merges without panics.
func FuzzIngest(f *testing.F) {
	f.Add(mkTar(f, file("a", "hello"), file("b/c", "")))
	f.Add(gz(f, mkTar(f, file("x", strings.Repeat("y", 1000)))))
	f.Add(zst(f, mkTar(f, file(".wh.x", ""), file("d/.wh..wh..opq", ""))))
	f.Fuzz(func(t *testing.T, data []byte) {
		ctx := context.Background()
		mc := newMemCAS()
		m, err := ingest(ctx, mc, bytes.NewReader(data), fuzzOpts)
		if err != nil {
			return
		}
		enc, err := m.Marshal()
		if err != nil {
			t.Fatalf("marshal: %v", err)
		}
		m2, err := Unmarshal(enc)
		if err != nil {
			t.Fatalf("unmarshal of own encoding: %v", err)
		}
		var out bytes.Buffer
		if err := Export(ctx, mc, m2, &out); err != nil {
			t.Fatalf("export: %v", err)
		}
		if sha(out.Bytes()) != m.DiffID || int64(out.Len()) != m.Size {
			t.Fatal("export does not hash to the diffID")
		}
		if DetectCompression(bufio.NewReader(bytes.NewReader(data))) == Uncompressed && !bytes.Equal(out.Bytes(), data) {
			t.Fatal("export differs from the input")
		}
		_, _ = Merge([]*Manifest{m2, m2})
	})
}

// FuzzManifestDecode: Unmarshal refuses or returns a manifest that
// re-encodes to the same thing and can be used without panics.
func FuzzManifestDecode(f *testing.F) {
	mc := newMemCAS()
	for _, layer := range [][]byte{
		mkTar(f, file("a", "hello"), tarEnt{hdr: tarHeaderLink("l", "a")}),
		mkTar(f, file("d/.wh.gone", ""), file("x/.wh..wh..opq", "")),
	} {
		m, err := ingest(context.Background(), mc, bytes.NewReader(layer), IngestOptions{})
		if err != nil {
			f.Fatal(err)
		}
		b, err := m.Marshal()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
		plain, err := zdec().DecodeAll(b[5:len(b)-32], nil)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(plain)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := Unmarshal(data)
		if err != nil {
			// The checksum stops mutations early: also feed the bytes to
			// the body parser directly, which must cope on its own.
			if m, err = decodeBody(data); err != nil {
				return
			}
		}
		b, err := m.Marshal()
		if err != nil {
			t.Fatalf("re-marshal: %v", err)
		}
		m2, err := Unmarshal(b)
		if err != nil || len(m2.Entries) != len(m.Entries) || m2.DiffID != m.DiffID {
			t.Fatalf("re-decode: %v", err)
		}
		_ = m.Objects()
		_, _ = Merge([]*Manifest{m})
		_ = Export(context.Background(), newMemCAS(), m, &bytes.Buffer{})
	})
}

// TestWriteFuzzSeeds regenerates testdata/fuzz seeds from GNU tar output
// (DUPSNAP_WRITE_SEEDS=1); the committed seeds are what fuzzing starts from.
func TestWriteFuzzSeeds(t *testing.T) {
	if os.Getenv("DUPSNAP_WRITE_SEEDS") == "" {
		t.Skip("set DUPSNAP_WRITE_SEEDS=1 to regenerate the seed corpus")
	}
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "f"), []byte("content\n"), 0o644)
	writeFile(t, filepath.Join(dir, strings.Repeat("n", 110)), []byte("long"), 0o644)
	must(t, os.Link(filepath.Join(dir, "f"), filepath.Join(dir, "h")))
	must(t, os.Symlink("f", filepath.Join(dir, "s")))
	must(t, unix.Mkfifo(filepath.Join(dir, "p"), 0o600))
	sp, err := os.Create(filepath.Join(dir, "sparse"))
	must(t, err)
	must(t, sp.Truncate(20000))
	sp.WriteAt([]byte("island"), 9000)
	sp.Close()
	out := filepath.Join("testdata", "fuzz", "FuzzIngest")
	must(t, os.MkdirAll(out, 0o755))
	for i, args := range [][]string{
		{"--format=gnu", "--sparse"}, {"--format=oldgnu", "--sparse"},
		{"--format=posix", "--sparse", "--sparse-version=1.0"}, {"--format=posix", "--sparse", "--sparse-version=0.1"},
		{"--format=ustar"}, {"--format=v7"},
	} {
		files := []string{"."}
		if i >= 4 { // ustar and v7 cannot hold the long name
			files = []string{"f", "h", "s", "sparse"}
		}
		tarb := run(t, dir, "tar", append(append([]string{"-c", "-f", "-", "-b", "1"}, args...), files...)...)
		name := fmt.Sprintf("gnutar-%d-%s", i, strings.TrimPrefix(args[0], "--format="))
		must(t, os.WriteFile(filepath.Join(out, name), []byte(fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", tarb)), 0o644))
	}
	mout := filepath.Join("testdata", "fuzz", "FuzzManifestDecode")
	must(t, os.MkdirAll(mout, 0o755))
	tarb := run(t, dir, "tar", "-c", "-f", "-", "-b", "1", "--format=posix", "--sparse", ".")
	m, err := ingest(context.Background(), newMemCAS(), bytes.NewReader(tarb), IngestOptions{})
	must(t, err)
	b, err := m.Marshal()
	must(t, err)
	must(t, os.WriteFile(filepath.Join(mout, "gnutar-posix"), []byte(fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", b)), 0o644))
}
