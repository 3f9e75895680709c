package rootfs

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// TestMeasure prints the numbers of the rootfs against overlayfs. It is
// skipped unless DUPSNAP_ROOTFS_MEASURE=1 (it reads 256 MiB several times).
func TestMeasure(t *testing.T) {
	needRoot(t)
	if os.Getenv("DUPSNAP_ROOTFS_MEASURE") == "" {
		t.Skip("set DUPSNAP_ROOTFS_MEASURE=1")
	}
	e := newEnv(t)
	var ents []tarEntry
	for d := 0; d < 100; d++ {
		ents = append(ents, tarEntry{name: fmt.Sprintf("usr/d%d/", d), typ: '5'})
		for f := 0; f < 30; f++ {
			ents = append(ents, tarEntry{name: fmt.Sprintf("usr/d%d/f%d", d, f), body: fmt.Sprintf("%d-%d", d, f)})
		}
	}
	big := strings.Repeat("x", 256<<20)
	ents = append(ents, tarEntry{name: "big", body: big})
	layer := e.addLayer(t, makeTar(t, ents))
	mp := filepath.Join(e.dir, "view", "rootfs")
	cfg := Config{Mountpoint: mp, CASRoot: e.cas.Root(), ManifestRoot: filepath.Join(e.dir, "manifests"), Layers: []digestT{layer}, ReadOnly: true}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	os.MkdirAll(mp, 0o755)
	pid, err := Start(ctx, dupsnapBin(t), cfg, filepath.Join(e.dir, "rootfs.log"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		sctx, c := context.WithTimeout(context.Background(), 10*time.Second)
		defer c()
		Stop(sctx, mp)
		syscall.Kill(pid, syscall.SIGKILL)
		forceUnmount(mp)
	})

	// overlayfs over the same files, extracted.
	lower := filepath.Join(e.dir, "lower")
	os.MkdirAll(lower, 0o755)
	copyTree(t, mp, lower)
	ovl := filepath.Join(e.dir, "ovl")
	for _, d := range []string{ovl, ovl + "-u", ovl + "-w"} {
		os.MkdirAll(d, 0o755)
	}
	if err := syscall.Mount("overlay", ovl, "overlay", 0, "lowerdir="+lower+",upperdir="+ovl+"-u,workdir="+ovl+"-w"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Unmount(ovl, syscall.MNT_DETACH) })

	walk := func(root string) time.Duration {
		var best time.Duration
		for i := 0; i < 4; i++ {
			start := time.Now()
			n := 0
			filepath.Walk(filepath.Join(root, "usr"), func(p string, fi os.FileInfo, err error) error { n++; return nil })
			if d := time.Since(start); i > 0 && (best == 0 || d < best) {
				best = d
			}
			if n != 3101 {
				t.Fatalf("walked %d entries", n)
			}
		}
		return best
	}
	wf, wo := walk(mp), walk(ovl)
	t.Logf("warm walk+lstat of 3100 entries: rootfs %v, overlayfs %v (ratio %.2fx of overlay speed)", wf, wo, float64(wo)/float64(wf))

	read := func(p string) time.Duration {
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		io.Copy(io.Discard, f) // warm
		f.Seek(0, 0)
		start := time.Now()
		buf := make([]byte, 1<<20)
		var n int64
		for {
			k, err := f.Read(buf)
			n += int64(k)
			if err != nil {
				break
			}
		}
		if n != 256<<20 {
			t.Fatalf("read %d bytes", n)
		}
		return time.Since(start)
	}
	objs := e.cas.Path(digestOf(big))
	rf, rd := read(filepath.Join(mp, "big")), read(objs)
	mb := func(d time.Duration) float64 { return 256 / d.Seconds() }
	t.Logf("warm sequential read 256 MiB: rootfs %.0f MB/s, CAS object direct %.0f MB/s (ratio %.2f)", mb(rf), mb(rd), float64(rd)/float64(rf))
	st, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, l := range strings.Split(string(st), "\n") {
		if strings.HasPrefix(l, "VmRSS") {
			t.Logf("rootfs server after walks and reads: %s", strings.Join(strings.Fields(l), " "))
		}
	}
}

type digestT = digest.Digest

func digestOf(s string) digest.Digest { return digest.FromString(s) }
