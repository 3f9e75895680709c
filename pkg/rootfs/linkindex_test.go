package rootfs

import (
	"context"
	"path/filepath"
	"reflect"
	"testing"
)

// A rootFS made with the link index a spare built ahead is the one
// newRootFS makes by itself: same tree, same index of hardlinked names.
func TestNewRootFSPrebuiltIndex(t *testing.T) {
	e := newEnv(t)
	cfg := Config{CASRoot: e.cas.Root(), ManifestRoot: filepath.Join(e.dir, "manifests"), Layers: baseLayers(t, e)}
	tree, store, _, err := loadTree(context.Background(), cfg, newPhases())
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	fixRoot(tree)
	want := newRootFS(tree, store, cfg, nil)
	if len(want.links) == 0 {
		t.Fatal("test chain has no hardlinks")
	}
	got := newRootFS(tree, store, cfg, linkIndex(tree))
	if got.tree != tree {
		t.Fatal("tree not the one given")
	}
	if !reflect.DeepEqual(got.links, want.links) {
		t.Fatalf("links %v, want %v", got.links, want.links)
	}
}
