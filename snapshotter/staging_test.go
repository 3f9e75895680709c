package snapshotter

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"

	"github.com/dupsnap/dupsnap/pkg/layout"
)

// upperOf is the staging dir of an unpack mount.
func upperOf(t *testing.T, ms []mount.Mount) string {
	t.Helper()
	for _, o := range ms[0].Options {
		if v, ok := strings.CutPrefix(o, "upperdir="); ok {
			return v
		}
	}
	t.Fatalf("no upperdir in %+v", ms)
	return ""
}

// Parallel unpack (no parent at Prepare, parent given at Commit): a
// directory the applier created implicitly for a tar that omits it (0755
// root, fresh mtime) must not override the parent's directory (/tmp 1777);
// an explicit directory (tar mtime restored) and an implicit one the parent
// lacks keep their entries. Files are adopted, not copied.
func TestUnpackImplicitParentDirs(t *testing.T) {
	ctx := context.Background()
	s := newTestSnapshotter(t)
	old := time.Unix(1700000000, 0)
	unpack := func(key, target string) string {
		ms, err := s.Prepare(ctx, key, "", snapshots.WithLabels(map[string]string{snapshots.LabelSnapshotRef: target}))
		if err != nil {
			t.Fatal(err)
		}
		return upperOf(t, ms)
	}
	mkdir := func(p string, mode os.FileMode, mtime *time.Time) {
		if err := os.Mkdir(p, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
		if mtime != nil {
			os.Chtimes(p, *mtime, *mtime)
		}
	}

	up := unpack("k1", "t1")
	mkdir(filepath.Join(up, "tmp"), 0o777|os.ModeSticky, &old)
	mkdir(filepath.Join(up, "usr"), 0o755, &old)
	if err := os.WriteFile(filepath.Join(up, "usr", "f"), []byte("lower"), 0o644); err != nil {
		t.Fatal(err)
	}
	os.Chtimes(filepath.Join(up, "usr"), old, old)
	if err := s.Commit(ctx, "c1", "k1"); err != nil {
		t.Fatal(err)
	}

	up = unpack("k2", "t2")
	time.Sleep(10 * time.Millisecond)             // the applier runs after Prepare
	mkdir(filepath.Join(up, "tmp"), 0o755, nil)   // implicit, parent has it
	mkdir(filepath.Join(up, "usr"), 0o755, &old)  // explicit (tar mtime)
	mkdir(filepath.Join(up, "fresh"), 0o755, nil) // implicit, parent lacks it
	for _, f := range []string{"tmp/x", "usr/g", "fresh/y"} {
		if err := os.WriteFile(filepath.Join(up, f), []byte(f), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	os.Chtimes(filepath.Join(up, "usr"), old, old)
	if err := s.Commit(ctx, "c2", "k2", snapshots.WithParent("c1")); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(up); !os.IsNotExist(err) {
		t.Fatalf("staging dir left after commit: %v", err)
	}

	var chain []*layout.Manifest
	for _, name := range []string{"c1", "c2"} {
		info, err := s.Stat(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		if name == "c2" && info.Parent != "c1" {
			t.Fatalf("c2 parent %q", info.Parent)
		}
		ids, err := s.chainOf(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		id := ids[0]
		k, err := s.manifestKey(id)
		if err != nil {
			t.Fatal(err)
		}
		m, err := s.layers.Get(ctx, k)
		if err != nil {
			t.Fatal(err)
		}
		chain = append(chain, m)
	}
	top := map[string]bool{}
	for _, e := range chain[1].Entries {
		top[e.Path] = true
	}
	if top["tmp"] || !top["tmp/x"] || !top["usr"] || !top["fresh"] || !top["fresh/y"] {
		t.Fatalf("layer 2 entries: %v", top)
	}
	tree, err := layout.Merge(chain)
	if err != nil {
		t.Fatal(err)
	}
	if n := tree.Lookup("tmp"); n == nil || n.Entry.Mode&0o7777 != 0o1777 {
		t.Fatalf("merged /tmp: %+v", n)
	}
	for _, f := range []string{"tmp/x", "usr/f", "usr/g", "fresh/y"} {
		n := tree.Lookup(f)
		if n == nil || !s.cas.Has(n.Entry.Digest) {
			t.Fatalf("merged %s: %+v", f, n)
		}
	}
}
