package recipe

import (
	"bytes"
	stdgzip "compress/gzip"
	"context"
	"encoding/base64"
	"errors"
	"hash/crc32"
	"io"
	"testing"

	"github.com/opencontainers/go-digest"
)

// chunkedFixture is a compress/gzip blob of the golden input with a recipe
// that has checkpoints.
func chunkedFixture(t *testing.T, level int) (tb, blob []byte, r *Recipe) {
	t.Helper()
	tb = genTar(t, 1<<20)
	var b bytes.Buffer
	gzipBuilder("", level, false, nil).fn(t, &b, tb)
	r = mustDetect(t, b.Bytes(), tb)
	if r == nil || r.Chunks() < 3 {
		t.Fatalf("level %d: recipe %v without checkpoints", level, r)
	}
	return tb, b.Bytes(), r
}

func restoreBytes(t *testing.T, r *Recipe, tb, blob []byte) ([]byte, error) {
	t.Helper()
	var out bytes.Buffer
	err := r.Restore(context.Background(), &out, tarFunc(tb), digest.FromBytes(blob))
	if !bytes.HasPrefix(blob, out.Bytes()) {
		t.Fatalf("Restore wrote %d bytes that are not a prefix of the blob", out.Len())
	}
	return out.Bytes(), err
}

// Levels 4-9 of compress/gzip get checkpoints; the chunked restore, also
// after a marshal round trip, is the blob. Levels 1-3 stay sequential.
func TestChunkedRecipeRestores(t *testing.T) {
	for _, level := range []int{4, 6, 9} {
		tb, blob, r := chunkedFixture(t, level)
		m, err := r.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		r2, err := Unmarshal(m)
		if err != nil {
			t.Fatal(err)
		}
		if r2.Chunks() != r.Chunks() {
			t.Fatalf("chunks %d after round trip, want %d", r2.Chunks(), r.Chunks())
		}
		t.Logf("level %d: %d chunks, recipe %d bytes", level, r2.Chunks(), len(m))
		checkApply(t, r2, blob, tb)
		out, err := restoreBytes(t, r2, tb, blob)
		if err != nil || !bytes.Equal(out, blob) {
			t.Fatalf("level %d: Restore: %v (%d of %d bytes)", level, err, len(out), len(blob))
		}
	}
	tb := genTar(t, 1<<20)
	var b bytes.Buffer
	gzipBuilder("", 2, false, nil).fn(t, &b, tb)
	if r := mustDetect(t, b.Bytes(), tb); r == nil || r.Chunks() != 1 {
		t.Fatalf("level 2: %v", r)
	}
}

// A recipe stored before checkpoints existed (version 1) still restores.
func TestVersion1RecipeRestores(t *testing.T) {
	// Marshal of gzip/go/6 with a 10-byte Go header, size of the golden blob,
	// as written by the version-1 code.
	tb := genTar(t, 1<<20)
	var b bytes.Buffer
	gzipBuilder("", 6, false, nil).fn(t, &b, tb)
	old := &Recipe{Format: FormatGzip, enc: encGoFlate, level: 6, header: b.Bytes()[:10], size: int64(b.Len())}
	m, err := old.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(m, []byte(`{"v":1,`)) || bytes.Contains(m, []byte("chunks")) {
		t.Fatalf("not a version 1 recipe: %q", m)
	}
	r, err := Unmarshal(m)
	if err != nil {
		t.Fatal(err)
	}
	if r.Chunks() != 1 {
		t.Fatalf("version 1 recipe has %d chunks", r.Chunks())
	}
	out, err := restoreBytes(t, r, tb, b.Bytes())
	if err != nil || !bytes.Equal(out, b.Bytes()) {
		t.Fatalf("Restore: %v", err)
	}
	// Version 2 without checkpoints, or checkpoints on a recipe that
	// cannot use them, are refused.
	c, _ := chunkedRaw(t, r, `{"v":2,"format":"gzip","enc":"go","level":6,"header":"`+base64.StdEncoding.EncodeToString(r.header)+`","size":1}`)
	if _, err := Unmarshal(c); err == nil {
		t.Fatal("version 2 without checkpoints accepted")
	}
}

// chunkedRaw frames a hand-written wire body like Marshal does.
func chunkedRaw(t *testing.T, _ *Recipe, body string) ([]byte, error) {
	t.Helper()
	out := append([]byte(nil), magic...)
	out = append(out, body...)
	var crc [4]byte
	sum := crcCastagnoli(out)
	crc[0], crc[1], crc[2], crc[3] = byte(sum>>24), byte(sum>>16), byte(sum>>8), byte(sum)
	return append(out, crc[:]...), nil
}

// Damaged checkpoints never produce wrong bytes: a checkpoint that no
// longer matches the data or a wrong chunk checksum makes Restore finish
// sequentially (same bytes), and Apply fail having written only a correct
// prefix.
func TestCorruptCheckpointsFallBack(t *testing.T) {
	tb, blob, r := chunkedFixture(t, 6)
	mid := len(r.cps) / 2
	for name, mut := range map[string]func(c *Recipe){
		"bit+3":      func(c *Recipe) { c.cps[mid].Bit += 3 },
		"pending":    func(c *Recipe) { c.cps[mid].ByteAvail, c.cps[mid].Length = !c.cps[mid].ByteAvail, 3 },
		"index":      func(c *Recipe) { c.cps[mid].Index -= 50 },
		"crc":        func(c *Recipe) { c.crcs[mid] ^= 1 },
		"last crc":   func(c *Recipe) { c.crcs[len(c.crcs)-1] ^= 1 },
		"first":      func(c *Recipe) { c.cps[0].Offset = 1; c.cps[0].Length = 5; c.cps[0].ByteAvail = true },
		"base order": func(c *Recipe) { c.cps[mid].Base = 0 },
	} {
		t.Run(name, func(t *testing.T) {
			c := *r
			c.cps = append(c.cps[:0:0], r.cps...)
			c.crcs = append(c.crcs[:0:0], r.crcs...)
			mut(&c)
			// Through the wire too, when it still encodes (CRC-valid corruption).
			if m, err := c.Marshal(); err == nil {
				if u, err := Unmarshal(m); err == nil {
					c = *u
				} else {
					t.Logf("refused at unmarshal: %v", err)
					return
				}
			}
			var out bytes.Buffer
			err := c.Apply(context.Background(), &out, bytes.NewReader(tb))
			if err == nil || !errors.Is(err, errChunk) {
				t.Fatalf("Apply with damaged checkpoints: %v", err)
			}
			if !bytes.HasPrefix(blob, out.Bytes()) || out.Len() == len(blob) {
				t.Fatalf("Apply wrote %d bytes, not a strict prefix of the blob", out.Len())
			}
			got, err := restoreBytes(t, &c, tb, blob)
			if err != nil || !bytes.Equal(got, blob) {
				t.Fatalf("Restore did not fall back: %v", err)
			}
		})
	}
}

// Restore keeps the last byte back unless the blob verifies, so a streamed
// response is never complete and wrong.
func TestRestoreWithholdsUnverified(t *testing.T) {
	tb, blob, r := chunkedFixture(t, 6)
	wrongTar := bytes.Clone(tb)
	wrongTar[len(wrongTar)-600] ^= 1 // inside the last chunk's input
	for _, rr := range []*Recipe{r, {Format: r.Format, enc: r.enc, level: r.level, header: r.header, size: r.size}} {
		var out bytes.Buffer
		err := rr.Restore(context.Background(), &out, tarFunc(wrongTar), digest.FromBytes(blob))
		if err == nil {
			t.Fatalf("%d chunks: wrong tar restored", rr.Chunks())
		}
		if out.Len() >= len(blob) {
			t.Fatalf("%d chunks: %d bytes written for a blob that did not verify", rr.Chunks(), out.Len())
		}
	}
	var out bytes.Buffer
	if err := r.Restore(context.Background(), &out, tarFunc(tb), digest.FromBytes([]byte("other"))); err == nil || out.Len() != len(blob)-1 {
		t.Fatalf("wrong digest: %v, %d bytes written", err, out.Len())
	}
	if err := r.Restore(context.Background(), io.Discard, tarFunc(tb[:len(tb)/2]), digest.FromBytes(blob)); err == nil {
		t.Fatal("short tar restored")
	}
}

// A header with a name (not just Go's 10 bytes) goes through unchanged.
func TestChunkedKeepsHeader(t *testing.T) {
	tb := genTar(t, 600<<10)
	var b bytes.Buffer
	gzipBuilder("", 6, false, func(h *stdgzip.Header) { h.Name = "layer.tar"; h.Comment = "c" }).fn(t, &b, tb)
	r := mustDetect(t, b.Bytes(), tb)
	if r == nil || r.Chunks() < 2 {
		t.Fatalf("recipe %v", r)
	}
	checkApply(t, r, b.Bytes(), tb)
}

func crcCastagnoli(b []byte) uint32 { return crc32.Checksum(b, castagnoli) }

// goldenCheckpoints pins goflate's checkpoints (marshalChunks) for
// compress/gzip levels 4-9 of the golden input: a change means Capture or
// the Go encoder changed, and stored checkpoints may no longer resume.
var goldenCheckpoints = map[int]string{
	4: "0838a3a651b485134c1e6540cdb7a0f6c48f032a3a5daba2a32281998e2c4e90",
	6: "9907374ede414ca6ba274db75c21ccbba8f3a42f60cc8194bd0e02521c3d54fa",
	9: "e8aecc80ebcaf3971e60ae83ca766102bc6f3c718fe19b87947b90f56debae21",
}

func TestGoldenCheckpoints(t *testing.T) {
	tb := genTar(t, 1<<20)
	if got := digest.FromBytes(tb).String(); got != goldenInput {
		t.Fatalf("generated input changed: %s", got)
	}
	hdr := []byte{0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255}
	for level, want := range goldenCheckpoints {
		r := &Recipe{Format: FormatGzip, enc: encGoFlate, level: level, header: hdr}
		var blob bytes.Buffer
		if err := r.Apply(context.Background(), &blob, bytes.NewReader(tb)); err != nil {
			t.Fatal(err)
		}
		r.size = int64(blob.Len())
		d := digest.FromBytes(blob.Bytes())
		cps, ok, err := r.capture(context.Background(), bytes.NewReader(blob.Bytes()), r.size, d, tarFunc(tb))
		if err != nil || !ok {
			t.Fatalf("level %d: capture: %v %v", level, ok, err)
		}
		if ok, err := r.addCheckpoints(context.Background(), bytes.NewReader(blob.Bytes()), r.size, d, tarFunc(tb), cps); err != nil || !ok {
			t.Fatalf("level %d: no checkpoints: %v", level, err)
		}
		got := digest.FromBytes(r.marshalChunks()).Encoded()
		if got != want && !*updateGolden {
			t.Errorf("level %d: checkpoints %s, pinned %s", level, got, want)
		}
		var out bytes.Buffer
		if err := r.Apply(context.Background(), &out, bytes.NewReader(tb)); err != nil {
			t.Fatal(err)
		}
		if g := digest.FromBytes(out.Bytes()).Encoded(); g != goldenDigests[r.Encoder()] {
			t.Errorf("level %d: chunked output %s, pinned %s", level, g, goldenDigests[r.Encoder()])
		}
		if *updateGolden {
			t.Logf("\t%d: %q,", level, got)
		}
	}
}

// AddCheckpoints upgrades a version 1 recipe from its blob, and refuses
// (false, nil) a blob it does not reproduce.
func TestAddCheckpointsUpgrade(t *testing.T) {
	tb, blob, r := chunkedFixture(t, 6)
	ctx := context.Background()
	old := r.Sequential()
	if !old.Upgradable() || r.Upgradable() {
		t.Fatal("Upgradable")
	}
	bad := bytes.Clone(blob)
	bad[len(bad)/2] ^= 1
	if ok, err := old.AddCheckpoints(ctx, bytes.NewReader(bad), int64(len(bad)), digest.FromBytes(bad), tarFunc(tb)); ok || err != nil || old.Chunks() != 1 {
		t.Fatalf("wrong blob: %v %v, %d chunks", ok, err, old.Chunks())
	}
	ok, err := old.AddCheckpoints(ctx, bytes.NewReader(blob), int64(len(blob)), digest.FromBytes(blob), tarFunc(tb))
	if !ok || err != nil || old.Chunks() != r.Chunks() {
		t.Fatalf("upgrade: %v %v, %d chunks (want %d)", ok, err, old.Chunks(), r.Chunks())
	}
	checkApply(t, old, blob, tb)
}
