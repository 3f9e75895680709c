package stack

import "testing"

// Every image gets files of its own, and the set shares what it should.
func TestBuildSetShares(t *testing.T) {
	set, err := BuildSet(SetOptions{Images: 4, ImageMB: 8}, t.Logf)
	if err != nil {
		t.Skipf("no host files to build images from: %v", err)
	}
	if len(set) != 4 {
		t.Fatalf("%d images", len(set))
	}
	digests := map[string]int{}
	for _, im := range set {
		ls, err := im.Img.Layers()
		if err != nil {
			t.Fatal(err)
		}
		if len(ls) != 4 {
			t.Fatalf("%s: %d layers", im.Repo, len(ls))
		}
		for i, l := range ls {
			d, _ := l.Digest()
			digests[d.String()]++
			if i == 3 {
				if sz, _ := l.Size(); sz < 64<<10 {
					t.Errorf("%s: own layer only %d bytes", im.Repo, sz)
				}
			}
		}
		t.Logf("%s: %d files, %s", im.Repo, im.Files, MiB(im.Logical))
	}
	// base x4, two runtimes x2, 4 relocated + 4 own layers.
	if len(digests) != 1+2+4+4 {
		t.Errorf("%d distinct layers, want 11", len(digests))
	}
}
