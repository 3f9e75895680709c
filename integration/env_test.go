package integration

import (
	"context"
	"fmt"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/opencontainers/go-digest"

	"github.com/dupsnap/dupsnap/integration/harness"
)

// env is one private containerd + dupsnap + registry.
type env struct {
	dir string
	d   *harness.Dupsnap
	c   *harness.Containerd
	reg *harness.Registry
}

// newEnv starts the three; args go to `dupsnap serve`.
func newEnv(ctx context.Context, t *testing.T, args ...string) *env {
	t.Helper()
	harness.Require(t, harness.DupsnapBin())
	dir := harness.TempDir(t, "dsint-")
	e := &env{dir: dir}
	e.d = harness.StartDupsnap(ctx, t, dir, "[cas]\nno_sync = true\n", args...)
	e.c = harness.StartContainerd(ctx, t, dir, harness.ContainerdOptions{DupsnapSocket: e.d.Socket, DupsnapRoot: e.d.Root})
	e.reg = harness.StartRegistry(ctx, t, dir)
	t.Cleanup(func() {
		if t.Failed() {
			t.Log(e.d.Tail())
			t.Log(harness.LogTail(e.c.LogFile, 30))
		}
	})
	return e
}

func (e *env) ctr(ctx context.Context, t *testing.T, timeout time.Duration, args ...string) string {
	t.Helper()
	out, err := e.c.Ctr(ctx, timeout, args...)
	if err != nil {
		t.Fatalf("ctr: %v\n%s", err, e.d.Tail())
	}
	return out
}

// testImages builds two images from files of this machine: both share the
// base layer (layer-level dedup) and img2 carries img1's data files at
// other paths (file-level dedup, no shared layer).
type testImages struct {
	base, data []harness.File
	img1, img2 v1.Image
	// files of each image's regular content, for checksums and dedup sums.
	files1, files2 []harness.File
}

func buildImages(t *testing.T) *testImages {
	t.Helper()
	base, err := harness.BaseFiles()
	if err != nil {
		t.Fatal(err)
	}
	data, err := harness.HostFiles([]string{"/usr/share/doc", "/usr/share/common-licenses", "/usr/share/zoneinfo", "/usr/lib/x86_64-linux-gnu"}, 300, 512<<10, 4<<20)
	if err != nil {
		t.Fatal(err)
	}
	ti := &testImages{base: base, data: data}
	copy2 := harness.Relocate(data, "opt/copy")
	mk := func(content []harness.File) (v1.Image, []harness.File) {
		all := append(append([]harness.File{}, base...), content...)
		sums, err := harness.ChecksumList(all)
		if err != nil {
			t.Fatal(err)
		}
		checks := harness.File{Path: "checks.sha256", Data: sums}
		bl, err := harness.Layer(base)
		if err != nil {
			t.Fatal(err)
		}
		dl, err := harness.Layer(content)
		if err != nil {
			t.Fatal(err)
		}
		cl, err := harness.Layer([]harness.File{checks})
		if err != nil {
			t.Fatal(err)
		}
		img, err := harness.Image([]string{"/bin/sh"}, bl, dl, cl)
		if err != nil {
			t.Fatal(err)
		}
		return img, append(all, checks)
	}
	ti.img1, ti.files1 = mk(data)
	ti.img2, ti.files2 = mk(copy2)
	return ti
}

// pull pulls ref with snapshotter sn and returns how long it took.
func (e *env) pull(ctx context.Context, t *testing.T, sn, ref string) time.Duration {
	t.Helper()
	start := time.Now()
	e.ctr(ctx, t, 2*time.Minute, "image", "pull", "--plain-http", "--snapshotter", sn, ref)
	return time.Since(start)
}

// run runs a container to completion and returns its output.
func (e *env) run(ctx context.Context, t *testing.T, ref, id, script string) (string, error) {
	args := append([]string{"run", "--rm", "--snapshotter", "dupsnap"}, e.c.RunArgs()...)
	args = append(args, ref, id, "/bin/sh", "-c", script)
	return e.c.Ctr(ctx, 90*time.Second, args...)
}

type fileT struct {
	d    digest.Digest
	size int64
}

// toFileT lists the content digests of the regular files.
func toFileT(files []harness.File) []fileT {
	var out []fileT
	for _, f := range files {
		if !f.IsRegular() {
			continue
		}
		sum, err := f.SHA256()
		if err != nil {
			panic(err)
		}
		out = append(out, fileT{digest.NewDigestFromEncoded(digest.SHA256, sum), f.Size()})
	}
	return out
}

func firstRegular(files []harness.File, skip int) harness.File {
	for _, f := range files {
		if f.IsRegular() && f.Size() > 0 {
			if skip == 0 {
				return f
			}
			skip--
		}
	}
	panic(fmt.Sprintf("no regular file #%d", skip))
}
