package layout

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dupsnap/dupsnap/pkg/cas"
)

type tarEnt struct {
	hdr  tar.Header
	data []byte
}

func mkTar(t testing.TB, ents ...tarEnt) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range ents {
		h := e.hdr
		if h.Typeflag == 0 {
			h.Typeflag = tar.TypeReg
		}
		if h.Typeflag == tar.TypeReg && h.Size == 0 {
			h.Size = int64(len(e.data))
		}
		h.ModTime = time.Unix(1600000000, 0)
		must(t, tw.WriteHeader(&h))
		tw.Write(e.data)
	}
	must(t, tw.Close())
	return buf.Bytes()
}

func file(name, data string) tarEnt {
	return tarEnt{hdr: tar.Header{Name: name, Mode: 0o644}, data: []byte(data)}
}

// hostileCases are layers Ingest must refuse; each also runs against a real
// store (TestHostileStoreUnchanged) to show nothing becomes visible.
func hostileCases(t *testing.T) map[string][]byte {
	good := mkTar(t, file("a", strings.Repeat("x", 5000)), file("b", "y"))
	corruptHdr := append([]byte(nil), good...)
	copy(corruptHdr[148:156], "zzzzzzz\x00") // checksum field
	sizeHdr := append([]byte(nil), good...)
	copy(sizeHdr[124:136], "\x80\x00\x00\x00\x7f\xff\xff\xff\xff\xff\xff\xff") // base-256 size, huge
	badGzip := gz(t, good)
	badGzip[len(badGzip)-6] ^= 0xff // CRC
	badZstd := zst(t, good)
	badZstd = badZstd[:len(badZstd)/2]
	zeros := strings.Repeat("\x00", 1<<20)
	bomb := zst(t, mkTar(t, file("z1", zeros), file("z2", zeros), file("z3", zeros)))
	return map[string][]byte{
		"truncated-payload":    good[:1000],
		"truncated-header":     good[:300],
		"corrupt-checksum":     corruptHdr,
		"absurd-size":          sizeHdr,
		"bad-gzip-crc":         badGzip,
		"truncated-gzip":       gz(t, good)[:100],
		"truncated-zstd":       badZstd,
		"dotdot":               mkTar(t, file("a/../../etc/passwd", "x")),
		"dotdot-plain":         mkTar(t, file("../x", "x")),
		"absolute":             mkTar(t, file("/etc/passwd", "x")),
		"hardlink-dotdot":      mkTar(t, tarEnt{hdr: tar.Header{Name: "l", Typeflag: tar.TypeLink, Linkname: "../../etc/shadow"}}),
		"hardlink-absolute":    mkTar(t, tarEnt{hdr: tar.Header{Name: "l", Typeflag: tar.TypeLink, Linkname: "/etc/shadow"}}),
		"through-symlink":      mkTar(t, tarEnt{hdr: tar.Header{Name: "d", Typeflag: tar.TypeSymlink, Linkname: "/etc"}}, file("d/passwd", "x")),
		"through-symlink-deep": mkTar(t, tarEnt{hdr: tar.Header{Name: "a/b", Typeflag: tar.TypeSymlink, Linkname: "../.."}}, file("a/b/c/d", "x")),
		"hardlink-via-symlink": mkTar(t, tarEnt{hdr: tar.Header{Name: "d", Typeflag: tar.TypeSymlink, Linkname: "/etc"}}, tarEnt{hdr: tar.Header{Name: "l", Typeflag: tar.TypeLink, Linkname: "d/shadow"}}),
		"bad-whiteout":         mkTar(t, file("a/.wh.", "")),
		"unsupported-type":     mkTar(t, tarEnt{hdr: tar.Header{Name: "x", Typeflag: 'Q'}}),
		"decompression-bomb":   bomb,
		"too-many-entries":     mkTar(t, file("1", ""), file("2", ""), file("3", ""), file("4", ""), file("5", ""), file("6", "")),
		"file-too-big":         mkTar(t, file("big", strings.Repeat("b", 2<<20+1))),
		"long-pax-header":      mkTar(t, tarEnt{hdr: tar.Header{Name: "p", Typeflag: tar.TypeReg, PAXRecords: map[string]string{"comment": strings.Repeat("c", 100000)}}}),
		"garbage":              bytes.Repeat([]byte("not a tar at all "), 100),
		"trailing-garbage":     append(append([]byte(nil), good...), bytes.Repeat([]byte{1}, 200000)...),
	}
}

var hostileOpts = IngestOptions{MaxEntries: 5, MaxFileSize: 2 << 20, MaxHeaderLen: 16 << 10, MaxSize: 2 << 20}

func TestHostileInput(t *testing.T) {
	for name, layer := range hostileCases(t) {
		t.Run(name, func(t *testing.T) {
			_, err := ingest(context.Background(), newMemCAS(), bytes.NewReader(layer), hostileOpts)
			if !errors.Is(err, ErrInvalidLayer) {
				t.Fatalf("got %v, want ErrInvalidLayer", err)
			}
			t.Log(err)
		})
	}
	// The same options accept an ordinary layer.
	ok := mkTar(t, file("a", "x"), tarEnt{hdr: tar.Header{Name: "s", Typeflag: tar.TypeSymlink, Linkname: "/etc"}}, file("b/c", "y"))
	roundTripOpts(t, ok, hostileOpts)
}

func roundTripOpts(t *testing.T, layer []byte, opts IngestOptions) {
	t.Helper()
	mc := newMemCAS()
	m, err := ingest(context.Background(), mc, bytes.NewReader(layer), opts)
	must(t, err)
	var out bytes.Buffer
	must(t, Export(context.Background(), mc, m, &out))
	if !bytes.Equal(out.Bytes(), layer) {
		t.Fatal("round trip differs")
	}
}

// TestHostileStoreUnchanged imports each hostile layer into a real store:
// every import fails and the store's directories are left exactly as before.
func TestHostileStoreUnchanged(t *testing.T) {
	root := t.TempDir()
	c, s, err := OpenRoot(root)
	must(t, err)
	defer c.Close()
	ctx := context.Background()
	_, err = s.Import(ctx, bytes.NewReader(mkTar(t, file("base", "base content"))), IngestOptions{})
	must(t, err)
	before := snapshotDir(t, root)
	for name, layer := range hostileCases(t) {
		if _, err := s.Import(ctx, bytes.NewReader(layer), hostileOpts); !errors.Is(err, ErrInvalidLayer) {
			t.Errorf("%s: got %v", name, err)
		}
	}
	if after := snapshotDir(t, root); after != before {
		t.Fatalf("store changed:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

// snapshotDir lists every file with its size (lock files excluded).
func snapshotDir(t *testing.T, root string) string {
	var b strings.Builder
	filepath.Walk(root, func(p string, fi os.FileInfo, err error) error {
		if err != nil || fi.IsDir() || strings.Contains(fi.Name(), "lock") {
			return nil
		}
		rel, _ := filepath.Rel(root, p)
		b.WriteString(rel + " " + string(rune('0'+fi.Size()%10)) + "\n")
		return nil
	})
	return b.String()
}

func tarHeaderLink(name, target string) tar.Header {
	return tar.Header{Name: name, Typeflag: tar.TypeLink, Linkname: target}
}

type failWriter struct{ n int }

func (f *failWriter) Write(p []byte) (int, error) {
	if f.n -= len(p); f.n < 0 {
		return 0, errors.New("disk full")
	}
	return len(p), nil
}

// TestExportErrors: a missing object and a failing writer end the export
// with their own errors.
func TestExportErrors(t *testing.T) {
	ctx := context.Background()
	layer := mkTar(t, file("a", strings.Repeat("a", 3<<20)), file("b", "bbb"))
	mc := newMemCAS()
	m, err := ingest(ctx, mc, bytes.NewReader(layer), IngestOptions{})
	must(t, err)
	if err := Export(ctx, mc, m, &failWriter{n: 1 << 20}); err == nil || err.Error() != "disk full" {
		t.Fatalf("failing writer: %v", err)
	}
	mc.mu.Lock()
	delete(mc.objs, m.Entries[1].Digest)
	mc.mu.Unlock()
	if err := Export(ctx, mc, m, io.Discard); !errors.Is(err, cas.ErrNotFound) {
		t.Fatalf("missing object: %v", err)
	}
	mc.mu.Lock()
	mc.objs[m.Entries[1].Digest] = []byte("bbbb")
	mc.mu.Unlock()
	if err := Export(ctx, mc, m, io.Discard); !errors.Is(err, cas.ErrDigestMismatch) {
		t.Fatalf("longer object: %v", err)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if err := Export(cctx, mc, m, io.Discard); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled: %v", err)
	}
}
