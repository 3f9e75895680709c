package rootfs

import (
	"context"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/dupsnap/dupsnap/pkg/layout"
)

func mergedTree(t *testing.T, e *env, layers []digest.Digest) *layout.Tree {
	t.Helper()
	cfg := Config{CASRoot: e.cas.Root(), ManifestRoot: filepath.Join(e.dir, "manifests"), Layers: layers}
	tree, store, cached, err := loadTree(context.Background(), cfg, newPhases())
	if err != nil {
		t.Fatal(err)
	}
	store.Close()
	if cached {
		t.Fatal("tree came from the cache before any was written")
	}
	return tree
}

// The cached tree is the merged tree: same entries, inode numbers, link
// counts, and hardlinked names still share one node.
func TestTreeCacheRoundTrip(t *testing.T) {
	e := newEnv(t)
	layers := baseLayers(t, e)
	mroot := filepath.Join(e.dir, "manifests")
	want := mergedTree(t, e, layers)
	if loadTreeCache(mroot, layers) != nil {
		t.Fatal("cache hit before store")
	}
	if err := storeTreeCache(mroot, layers, want); err != nil {
		t.Fatal(err)
	}
	got := loadTreeCache(mroot, layers)
	if got == nil {
		t.Fatal("no cache hit after store")
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatal("cached tree differs from the merged tree")
	}
	if a, b := got.Lookup("tree/sub/b"), got.Lookup("tree/link-b"); a == nil || a != b || a.Nlink != 2 {
		t.Fatalf("hardlinked names do not share a node: %p %p", a, b)
	}
	if got.Lookup("bin/tool").Entry.Xattrs["security.capability"] == "" {
		t.Fatal("xattr lost")
	}
	// loadTree now takes it from the cache.
	cfg := Config{CASRoot: e.cas.Root(), ManifestRoot: mroot, Layers: layers}
	tree, store, cached, err := loadTree(context.Background(), cfg, newPhases())
	if err != nil {
		t.Fatal(err)
	}
	store.Close()
	if !cached || !reflect.DeepEqual(tree, want) {
		t.Fatalf("loadTree: cached=%v, equal=%v", cached, reflect.DeepEqual(tree, want))
	}
	// Another chain (a prefix) has a key of its own.
	if loadTreeCache(mroot, layers[:1]) != nil {
		t.Fatal("cache hit for another chain")
	}
	// A layer that is gone fails the start even with a cached tree.
	if err := e.ms.Delete(context.Background(), layers[1]); err != nil {
		t.Fatal(err)
	}
	if _, _, _, err := loadTree(context.Background(), cfg, newPhases()); err == nil {
		t.Fatal("loadTree succeeded with a layer missing")
	}
}

// A damaged cache file is never used: truncated, flipped bits, another
// chain's file under this name.
func TestTreeCacheCorrupt(t *testing.T) {
	e := newEnv(t)
	layers := baseLayers(t, e)
	mroot := filepath.Join(e.dir, "manifests")
	tree := mergedTree(t, e, layers)
	key := treeKey(layers)
	b, err := encodeTree(tree, key)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := decodeTree(b, key); err != nil {
		t.Fatalf("decode of a good encoding: %v", err)
	}
	if _, err := decodeTree(b, treeKey(layers[:1])); err == nil {
		t.Fatal("decoded under another chain's key")
	}
	for _, n := range []int{0, 5, len(b) / 2, len(b) - 1} {
		if _, err := decodeTree(b[:n], key); err == nil {
			t.Fatalf("decoded a file truncated to %d bytes", n)
		}
	}
	for _, i := range []int{6, len(b) / 3, len(b) - 5} {
		c := append([]byte(nil), b...)
		c[i] ^= 0x40
		if _, err := decodeTree(c, key); err == nil {
			t.Fatalf("decoded with byte %d flipped", i)
		}
	}
	os.MkdirAll(treeCacheDir(mroot), 0o700)
	if err := os.WriteFile(treeCachePath(mroot, layers), b[:len(b)-1], 0o600); err != nil {
		t.Fatal(err)
	}
	if loadTreeCache(mroot, layers) != nil {
		t.Fatal("truncated cache file used")
	}
}

// Trimming keeps the most recently used trees and drops old temp files.
func TestTreeCacheTrim(t *testing.T) {
	dir := t.TempDir()
	old := time.Now().Add(-time.Hour)
	for i, name := range []string{"a", "b", "c", "d", ".tmp-1"} {
		p := filepath.Join(dir, name)
		os.WriteFile(p, nil, 0o600)
		mt := old.Add(time.Duration(i) * time.Minute)
		os.Chtimes(p, mt, mt)
	}
	left := func() string {
		des, _ := os.ReadDir(dir)
		var names []string
		for _, de := range des {
			names = append(names, de.Name())
		}
		return strings.Join(names, ",")
	}
	trimTreeCache(dir, 3, 1<<20)
	if got := left(); got != "b,c,d" {
		t.Fatalf("left after trim by count: %v", got)
	}
	// By bytes: the newest is kept even if alone it is too big.
	os.WriteFile(filepath.Join(dir, "d"), make([]byte, 100), 0o600)
	os.Chtimes(filepath.Join(dir, "d"), time.Now(), time.Now())
	trimTreeCache(dir, 3, 50)
	if got := left(); got != "d" {
		t.Fatalf("left after trim by bytes: %v", got)
	}
}

// A server writes the tree of its chain after mounting, and the next
// server of that chain serves from it: shown with a doctored cache.
func TestTreeCacheServed(t *testing.T) {
	needRoot(t)
	e := newEnv(t)
	layers := baseLayers(t, e)
	mroot := filepath.Join(e.dir, "manifests")
	cfg := func(name string) Config {
		return Config{Mountpoint: filepath.Join(e.dir, name, "rootfs"), CASRoot: e.cas.Root(), ManifestRoot: mroot, Layers: layers, ReadOnly: true}
	}
	stop1 := serve(t, cfg("v1"))
	deadline := time.Now().Add(10 * time.Second)
	for loadTreeCache(mroot, layers) == nil {
		if time.Now().After(deadline) {
			t.Fatal("first server wrote no tree cache")
		}
		time.Sleep(10 * time.Millisecond)
	}
	serve(t, cfg("v2"))
	compareTrees(t, "cached vs merged", cfg("v1").Mountpoint, cfg("v2").Mountpoint)
	stop1()

	tree := loadTreeCache(mroot, layers)
	tree.Root.Children["from-cache"] = &layout.Node{Entry: layout.Entry{Type: layout.TypeDir, Path: "from-cache", Mode: 0o755},
		Children: map[string]*layout.Node{}, Nlink: 2, Ino: 100000}
	if err := storeTreeCache(mroot, layers, tree); err != nil {
		t.Fatal(err)
	}
	serve(t, cfg("v3"))
	if fi, err := os.Stat(filepath.Join(cfg("v3").Mountpoint, "from-cache")); err != nil || !fi.IsDir() {
		t.Fatalf("server did not use the cached tree: %v", err)
	}
}

// Seeds only in `go test`: decodeTree must refuse, never panic.
func FuzzDecodeTree(f *testing.F) {
	n := &layout.Node{Entry: layout.Entry{Type: layout.TypeDir, Path: ".", Mode: 0o755}, Ino: 1, Nlink: 3}
	file := &layout.Node{Entry: layout.Entry{Type: layout.TypeFile, Path: "a", Size: 3, Digest: digest.FromString("abc"),
		Xattrs: map[string]string{"user.x": "y"}}, Ino: 2, Nlink: 2}
	sub := &layout.Node{Entry: layout.Entry{Type: layout.TypeDir, Path: "d"}, Ino: 3, Nlink: 2,
		Children: map[string]*layout.Node{"b": file}}
	n.Children = map[string]*layout.Node{"a": file, "d": sub}
	b, err := encodeTree(&layout.Tree{Root: n}, "k")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	f.Add(b[:len(b)/2])
	f.Add([]byte("DSRT\x01"))
	f.Fuzz(func(t *testing.T, b []byte) {
		tree, err := decodeTree(b, "k")
		if err == nil {
			tree.Walk(func(string, *layout.Node) error { return nil })
		}
	})
}

// WarmTree builds the same tree a server would merge.
func TestWarmTree(t *testing.T) {
	e := newEnv(t)
	layers := baseLayers(t, e)
	mroot := filepath.Join(e.dir, "manifests")
	want := mergedTree(t, e, layers)
	if TreeCached(mroot, layers) {
		t.Fatal("cached before WarmTree")
	}
	if err := WarmTree(context.Background(), e.ms, layers); err != nil {
		t.Fatal(err)
	}
	if got := loadTreeCache(mroot, layers); got == nil || !reflect.DeepEqual(got, want) {
		t.Fatal("WarmTree's tree differs from the merged one")
	}
	if err := WarmTree(context.Background(), e.ms, append(layers, digest.FromString("gone"))); err == nil {
		t.Fatal("WarmTree of a chain with a missing layer succeeded")
	}
}
