package rootfs

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/containerd/containerd/v2/pkg/archive"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/dupsnap/dupsnap/pkg/layout"
)

// containerd's walking differ (archive.WriteDiff between a view of the
// parent and the active mount, as `ctr`/`nerdctl commit` use it) produces
// a layer that rebuilds the container's tree.
func TestWalkingDiffer(t *testing.T) {
	needRoot(t)
	e := newEnv(t)
	layers := baseLayers(t, e)
	mp := filepath.Join(e.dir, "active", "rootfs")
	cfg := Config{Mountpoint: mp, CASRoot: e.cas.Root(), ManifestRoot: filepath.Join(e.dir, "manifests"),
		Layers: layers, StateDir: filepath.Join(e.dir, "active", "state")}
	serve(t, cfg)
	vmp := filepath.Join(e.dir, "parent", "rootfs")
	serve(t, Config{Mountpoint: vmp, CASRoot: e.cas.Root(), ManifestRoot: filepath.Join(e.dir, "manifests"), Layers: layers, ReadOnly: true})
	plain := filepath.Join(e.dir, "plain")
	os.Mkdir(plain, 0o755)
	copyTree(t, mp, plain)
	randomOps(t, 11, 120, [2]string{mp, plain})
	compareTrees(t, "after ops", mp, plain)
	// containerd's tar writer carries only security.capability of the
	// xattrs: drop the test's user.t on both sides before diffing.
	for _, root := range []string{mp, plain} {
		filepath.Walk(root, func(p string, fi os.FileInfo, err error) error {
			if err == nil {
				unix.Lremovexattr(p, "user.t")
			}
			return nil
		})
	}

	var buf bytes.Buffer
	if err := archive.WriteDiff(context.Background(), &buf, vmp, mp); err != nil {
		t.Fatal(err)
	}
	m, err := e.ms.Import(context.Background(), bytes.NewReader(buf.Bytes()), layout.IngestOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("walking differ: %d bytes of tar, %d entries", buf.Len(), len(m.Entries))
	cmp := filepath.Join(e.dir, "rebuilt", "rootfs")
	serve(t, Config{Mountpoint: cmp, CASRoot: e.cas.Root(), ManifestRoot: filepath.Join(e.dir, "manifests"),
		Layers: append(append([]digest.Digest(nil), layers...), m.DiffID), ReadOnly: true})
	compareTrees(t, "layer from the walking differ", cmp, plain)
}
