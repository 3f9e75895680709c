package rootfs

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/opencontainers/go-digest"
)

// An image dir removed while something holds it open (a cwd, an fd, the
// attribute refresher's lookup) and made again: the new dir is another
// directory, and files can be created in it. Before, a lookup of the new
// dir answered the image dir's inode number, so the kernel attached the
// name to the removed dir's inode, dead: every create in it said ENOENT
// (seen in containerd's snapshot testsuite, 128LayersMount).
func TestRemadeImageDirIsNew(t *testing.T) {
	needRoot(t)
	e := newEnv(t)
	l := e.addLayer(t, makeTar(t, []tarEntry{
		{name: "onlyme/", typ: '5'},
		{name: "onlyme/bottom", body: "bye!\n"},
	}))
	cfg := activeCfg(e, []digest.Digest{l})
	serve(t, cfg)
	d := filepath.Join(cfg.Mountpoint, "onlyme")
	old, err := os.Open(d)
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	var before os.FileInfo
	if before, err = old.Stat(); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(d); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(d, 0o755); err != nil {
		t.Fatal(err)
	}
	// Make the kernel look the name up again (as it may at any time).
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("2"), 0); err != nil {
		t.Skipf("cannot drop dentries: %v", err)
	}
	after, err := os.Stat(d)
	if err != nil {
		t.Fatal(err)
	}
	if os.SameFile(before, after) {
		t.Error("the new dir has the removed image dir's identity")
	}
	if err := os.WriteFile(filepath.Join(d, "file"), []byte("only me!\n"), 0o644); err != nil {
		t.Fatalf("create in the new dir: %v", err)
	}
}
