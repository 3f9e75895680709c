package layout

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"testing"
	"time"
)

// realLayer tars existing paths of this machine with GNU tar (posix format,
// xattrs, numeric owners), the way an image build would.
func realLayer(t *testing.T, paths ...string) []byte {
	t.Helper()
	var have []string
	for _, p := range paths {
		if _, err := os.Lstat(p); err == nil {
			have = append(have, p[1:])
		}
	}
	if len(have) == 0 {
		t.Skip("none of the sample paths exist")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "tar", append([]string{"-c", "-f", "-", "-C", "/", "--format=posix", "--xattrs", "--numeric-owner", "--ignore-failed-read"}, have...)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		// Exit status 1 is "some files changed while read": still a valid tar.
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 {
			t.Fatalf("tar: %v: %s", err, errb.String())
		}
	}
	return out.Bytes()
}

// TestRealTreeLayers imports two layers built from this machine's files
// that share a directory, into a real store: each exports byte for byte,
// the shared files are stored once, and the manifests stay small.
func TestRealTreeLayers(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	l1 := realLayer(t, "/etc", "/usr/share/perl", "/usr/share/zoneinfo")
	l2 := realLayer(t, "/usr/share/zoneinfo", "/usr/share/i18n")
	c, s, err := OpenRoot(t.TempDir())
	must(t, err)
	defer c.Close()

	start := time.Now()
	m1, st1, err := s.ImportWithStats(ctx, bytes.NewReader(zst(t, l1)), IngestOptions{})
	must(t, err)
	d1 := time.Since(start)
	m2, st2, err := s.ImportWithStats(ctx, bytes.NewReader(gz(t, l2)), IngestOptions{})
	must(t, err)
	for _, x := range []struct {
		m     *Manifest
		plain []byte
	}{{m1, l1}, {m2, l2}} {
		var out bytes.Buffer
		must(t, Export(ctx, c, x.m, &out))
		if !bytes.Equal(out.Bytes(), x.plain) {
			t.Fatalf("layer %s: export differs at byte %d", x.m.DiffID, firstDiff(out.Bytes(), x.plain))
		}
		enc, err := x.m.Marshal()
		must(t, err)
		ratio := float64(len(enc)) / float64(x.m.Size)
		t.Logf("layer %s: %d entries, %d bytes, manifest %d bytes (%.3f%%)", x.m.DiffID.Encoded()[:12], len(x.m.Entries), x.m.Size, len(enc), 100*ratio)
		if ratio > 0.02 {
			t.Errorf("manifest overhead %.2f%% of the layer", 100*ratio)
		}
	}
	// Layer 2 shares zoneinfo with layer 1: only i18n is new.
	shared := m2.ContentBytes() - st2.NewBytes
	t.Logf("layer 1: %d bytes new of %d (%v); layer 2: %d new of %d", st1.NewBytes, m1.ContentBytes(), d1, st2.NewBytes, m2.ContentBytes())
	if st2.NewBytes >= m2.ContentBytes() || shared <= 0 {
		t.Fatalf("layer 2 added %d of %d bytes: shared files not deduplicated", st2.NewBytes, m2.ContentBytes())
	}
	tree, err := Merge([]*Manifest{m1, m2})
	must(t, err)
	if tree.Lookup("usr/share/perl") == nil && tree.Lookup("etc") == nil {
		t.Fatal("merged tree lacks the sample directories")
	}
}
