package integration

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/dupsnap/dupsnap/pkg/cas"
)

// TestPullRunDedup pulls two images that share a layer and, in different
// layers, files; runs containers that verify every image file's sha256
// against the source, write, delete and rename lower files; and checks the
// node store holds each distinct content exactly once.
func TestPullRunDedup(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 150*time.Second)
	defer cancel()
	e := newEnv(ctx, t)
	ti := buildImages(t)
	ref1, err := e.reg.Push(ctx, "dedup/one:v1", ti.img1)
	if err != nil {
		t.Fatal(err)
	}
	ref2, err := e.reg.Push(ctx, "dedup/two:v1", ti.img2)
	if err != nil {
		t.Fatal(err)
	}

	// One quick comparison with overlayfs (not a benchmark): pull, then
	// remove the image so content is fetched again for dupsnap.
	tOverlay := e.pull(ctx, t, "overlayfs", ref1)
	e.ctr(ctx, t, time.Minute, "image", "rm", "--sync", ref1)
	tDupsnap := e.pull(ctx, t, "dupsnap", ref1)
	tDupsnap2 := e.pull(ctx, t, "dupsnap", ref2)
	t.Logf("pull %s: overlayfs %v, dupsnap %v (ratio %.2f); second image sharing files: dupsnap %v",
		ref1, tOverlay, tDupsnap, float64(tDupsnap)/float64(tOverlay), tDupsnap2)

	// Containers: verify content, then mutate lower files.
	for i, c := range []struct{ ref string }{{ref1}, {ref2}} {
		files := ti.files1
		if i == 1 {
			files = ti.files2
		}
		del := firstRegular(files[len(ti.base):], 0)
		mv := firstRegular(files[len(ti.base):], 1)
		sum, err := mv.SHA256()
		if err != nil {
			t.Fatal(err)
		}
		script := strings.Join([]string{
			"set -e",
			"sha256sum -c --quiet /checks.sha256",
			"echo hello > /newfile",
			"test \"$(cat /newfile)\" = hello",
			"rm /" + del.Path,
			"test ! -e /" + del.Path,
			"mv /" + mv.Path + " /moved",
			"test ! -e /" + mv.Path,
			"sha256sum /moved",
			"mkdir -p /usr/share/newdir && echo x > /usr/share/newdir/f",
			"echo ALLOK",
		}, "\n")
		out, err := e.run(ctx, t, c.ref, "check"+string(rune('a'+i)), script)
		if err != nil {
			t.Fatalf("container on %s: %v\n%s", c.ref, err, out)
		}
		if !strings.Contains(out, "ALLOK") || !strings.Contains(out, sum+"  /moved") {
			t.Fatalf("container on %s did not verify: %s", c.ref, out)
		}
	}

	// The store holds every distinct content once: its object set is
	// exactly the set of distinct file digests of both images.
	want := map[digest.Digest]int64{}
	var logicalImages int64
	for _, set := range [][]fileT{toFileT(ti.files1), toFileT(ti.files2)} {
		for _, f := range set {
			want[f.d] = f.size
			logicalImages += f.size
		}
	}
	c, err := cas.Open(filepath.Join(e.d.Root, "cas"), cas.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	got := map[digest.Digest]int64{}
	var logicalStore int64
	if err := c.Walk(ctx, func(i cas.Info) error {
		got[i.Digest] = i.Size
		logicalStore += i.Size
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	for d := range want {
		if _, ok := got[d]; !ok {
			t.Errorf("store lacks %s", d)
		}
	}
	for d := range got {
		if _, ok := want[d]; !ok {
			t.Errorf("store has unexpected object %s (%d bytes)", d, got[d])
		}
	}
	t.Logf("images' file bytes %d, store logical bytes %d (%d objects)", logicalImages, logicalStore, len(got))
	if logicalStore*10 > logicalImages*6 {
		t.Errorf("store holds %d bytes for %d bytes of image files: shared files not deduplicated", logicalStore, logicalImages)
	}
}
