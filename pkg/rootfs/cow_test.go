package rootfs

import (
	"os"
	"path/filepath"
	"testing"
)

func TestCowBasic(t *testing.T) {
	needRoot(t)
	e := newEnv(t)
	layers := baseLayers(t, e)
	mp := filepath.Join(e.dir, "active", "rootfs")
	cfg := Config{Mountpoint: mp, CASRoot: e.cas.Root(), ManifestRoot: filepath.Join(e.dir, "manifests"),
		Layers: layers, StateDir: filepath.Join(e.dir, "active", "state")}
	serve(t, cfg)
	st := func(s string) {
		fi, err := os.Lstat(filepath.Join(mp, s))
		if err != nil {
			t.Logf("%s: %v", s, err)
			return
		}
		t.Logf("%s: size %d", s, fi.Size())
	}
	os.Chmod(filepath.Join(mp, "big"), 0o743)
	st("big")
	os.Link(filepath.Join(mp, "big"), filepath.Join(mp, "bin/n10"))
	st("big")
	st("bin/n10")
	os.Link(filepath.Join(mp, "bin/n10"), filepath.Join(mp, "n3"))
	st("big")
	st("n3")
	os.Link(filepath.Join(mp, "bin"), filepath.Join(mp, "big"))
	st("big")
}
