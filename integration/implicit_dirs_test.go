package integration

import (
	"archive/tar"
	"bytes"
	"context"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/dupsnap/dupsnap/integration/harness"
)

// TestImplicitParentDirs: a layer whose tar omits the parent directories of
// its files (tmp/, srv/data/) is pulled with parallel unpack, where the
// applier creates them 0755 in dupsnap's staging dir without knowing the
// parent; the container must still see the lower layer's modes (1777, 0750).
func TestImplicitParentDirs(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	e := newEnv(ctx, t)
	base, err := harness.BaseFiles()
	if err != nil {
		t.Fatal(err)
	}
	base = append(base, harness.File{Path: "tmp", Dir: true, Mode: 0o1777}, harness.File{Path: "srv/data", Dir: true, Mode: 0o750})
	bl, err := harness.Layer(base)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, name := range []string{"tmp/marker", "srv/data/x"} {
		tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: 2, ModTime: time.Unix(1700000000, 0), Typeflag: tar.TypeReg})
		tw.Write([]byte("x\n"))
	}
	tw.Close()
	raw := buf.Bytes()
	top, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(raw)), nil })
	if err != nil {
		t.Fatal(err)
	}
	img, err := harness.Image([]string{"/bin/sh"}, bl, top)
	if err != nil {
		t.Fatal(err)
	}
	ref, err := e.reg.Push(ctx, "implicit/dirs:v1", img)
	if err != nil {
		t.Fatal(err)
	}
	e.pull(ctx, t, "dupsnap", ref)
	out, err := e.run(ctx, t, ref, "implicit", "stat -c %a /tmp /srv/data && cat /tmp/marker /srv/data/x")
	if err != nil {
		t.Fatalf("run: %v\n%s\n%s", err, out, e.d.Tail())
	}
	got := strings.Fields(out) // ctr may print warnings first
	if len(got) >= 4 {
		got = got[len(got)-4:]
	}
	if len(got) != 4 || got[0] != "1777" || got[1] != "750" {
		t.Fatalf("modes seen in the container: %q, want 1777 750 (the lower layer's)", out)
	}
}
