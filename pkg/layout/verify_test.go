package layout

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/dupsnap/dupsnap/pkg/cas"
)

func verifyLayer(t *testing.T, plain []byte) (*Manifest, *memCAS) {
	t.Helper()
	mc := newMemCAS()
	m, err := ingest(context.Background(), mc, bytes.NewReader(plain), IngestOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// Through the wire form, as offloading receives it.
	enc, err := m.Marshal()
	must(t, err)
	m, err = Unmarshal(enc)
	must(t, err)
	return m, mc
}

// TestVerify: every real tar dupsnap ingests (GNU tar formats with sparse
// files, hardlinks, long names; PAX) verifies; a manifest that lies in its
// metadata, its content, its layout or its diffID does not.
func TestVerify(t *testing.T) {
	ctx := context.Background()
	sparse := 0
	seeds, _ := filepath.Glob(filepath.Join("testdata", "fuzz", "FuzzIngest", "gnutar-*"))
	for _, p := range seeds {
		b, err := os.ReadFile(p)
		must(t, err)
		s := strings.TrimSpace(strings.SplitN(string(b), "\n", 2)[1])
		q, err := strconv.Unquote(strings.TrimSuffix(strings.TrimPrefix(s, "[]byte("), ")"))
		must(t, err)
		m, mc := verifyLayer(t, []byte(q))
		if err := Verify(ctx, mc, m); err != nil {
			t.Errorf("%s: %v", filepath.Base(p), err)
		}
		// A sparse file's content is its expansion, which is no tar
		// payload: a lie about it must be caught by hashing.
		for i := range m.raw.segs {
			if m.raw.segs[i].payDigest != "" && m.Entries[i].Type == TypeFile {
				m.Entries[i].Digest = m.raw.segs[i].payDigest
				mc.objs[m.Entries[i].Digest] = mc.objs[m.raw.segs[i].payDigest]
				if err := Verify(ctx, mc, m); err == nil {
					t.Errorf("%s: sparse entry with a false content digest verified", filepath.Base(p))
				}
				sparse++
				break
			}
		}
	}
	if sparse == 0 {
		t.Error("no sparse entry in the seeds")
	}
	if len(seeds) == 0 {
		t.Error("no GNU tar seeds")
	}

	a, b := strings.Repeat("a", 3000), strings.Repeat("b", 3000)
	plain := mkTar(t, file("x", a), file("y", b), file(strings.Repeat("long/", 40)+"z", "zz"),
		tarEnt{hdr: tar.Header{Name: "e", Mode: 0o600}}, tarEnt{hdr: tar.Header{Name: "d/", Typeflag: tar.TypeDir, Mode: 0o755}})
	m, mc := verifyLayer(t, plain)
	if err := Verify(ctx, mc, m); err != nil {
		t.Fatal(err)
	}
	// Any refusal counts; want is the kind expected first.
	tamper := func(name string, fn func(m *Manifest), want error) {
		m, mc := verifyLayer(t, plain)
		fn(m)
		err := Verify(ctx, mc, m)
		if !errors.Is(err, want) && !errors.Is(err, ErrInvalidLayer) && !errors.Is(err, cas.ErrDigestMismatch) {
			t.Errorf("%s: got %v, want %v", name, err, want)
		}
	}
	tamper("mode", func(m *Manifest) { m.Entries[0].Mode |= 0o4000 }, ErrInvalidLayer)
	tamper("owner", func(m *Manifest) { m.Entries[1].UID = 7 }, ErrInvalidLayer)
	// Same sizes, contents swapped: the tar differs.
	tamper("swap", func(m *Manifest) {
		m.Entries[0].Digest, m.Entries[1].Digest = m.Entries[1].Digest, m.Entries[0].Digest
	}, cas.ErrDigestMismatch)
	tamper("diffid", func(m *Manifest) { m.DiffID = sha([]byte("other")) }, cas.ErrDigestMismatch)
	tamper("payload size", func(m *Manifest) { m.raw.segs[0].paySize-- }, ErrInvalidLayer)
	tamper("header bytes", func(m *Manifest) {
		h := append([]byte{}, m.raw.segs[1].hdr...)
		h[0] ^= 1
		m.raw.segs[1].hdr = h
	}, ErrInvalidLayer)
	// A missing object is an error, not a pass.
	m, mc = verifyLayer(t, plain)
	delete(mc.objs, m.Entries[0].Digest)
	if err := Verify(ctx, mc, m); err == nil {
		t.Error("verified with an object missing")
	}
}
