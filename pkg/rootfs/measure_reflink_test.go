package rootfs

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
)

// TestMeasureReflink compares warm sequential reads of a partly modified
// 256 MiB image file (2048 random 4 KiB writes) on an xfs with reflink:
// region path, reflink copy-up, and overlayfs over the same xfs, passes
// interleaved, medians; with the page cache folio sizes of each. Skipped
// unless DUPSNAP_ROOTFS_MEASURE=1. With DUPSNAP_MEASURE_TMPFS=1 it runs on
// TMPDIR's filesystem instead (ext4 here: no reflink, region vs overlayfs).
func TestMeasureReflink(t *testing.T) {
	if os.Getenv("DUPSNAP_ROOTFS_MEASURE") == "" {
		t.Skip("set DUPSNAP_ROOTFS_MEASURE=1")
	}
	onTmp := os.Getenv("DUPSNAP_MEASURE_TMPFS") == "1"
	var e *env
	if onTmp {
		needRoot(t)
		e = newEnv(t)
	} else {
		e = xfsEnv(t, 3<<30)
	}
	l := e.addLayer(t, makeTar(t, []tarEntry{{name: "rand", body: strings.Repeat("fedcba9876543210", measureBig/16)}}))
	layers := []digest.Digest{l}
	lower := extractLower(t, e, layers)

	mount := func(name string, rl bool) string {
		enableReflinkCopyUp(rl)
		reflinkSwitch.off.Store(false)
		cfg := activeCfg(e, layers)
		cfg.Mountpoint = filepath.Join(e.dir, name, "rootfs")
		cfg.StateDir = filepath.Join(e.dir, name, "state")
		serve(t, cfg)
		p := filepath.Join(cfg.Mountpoint, "rand")
		randWrite(t, p, 7)
		return p
	}
	t.Cleanup(func() { enableReflinkCopyUp(os.Getenv(reflinkEnv) == "1") })
	paths := map[string]string{"region": mount("region", false)}
	names := []string{"region", "overlayfs"}
	if !onTmp {
		paths["reflink"] = mount("reflink", true)
		names = []string{"region", "reflink", "overlayfs"}
	}
	enableReflinkCopyUp(false)

	ovl := filepath.Join(e.dir, "ovl")
	overlayAt(t, lower, ovl)
	paths["overlayfs"] = filepath.Join(ovl, "rand")
	randWrite(t, paths["overlayfs"], 7)
	for _, n := range names {
		seqRead(t, paths[n], measureBig) // warm
	}
	res := map[string][]float64{}
	for i := 0; i < 9; i++ {
		for j := range names {
			n := names[(i+j)%len(names)]
			res[n] = append(res[n], seqRead(t, paths[n], measureBig))
		}
	}
	var b strings.Builder
	for _, n := range names {
		fmt.Fprintf(&b, "%-10s warm seq read median %8.0f MB/s  (%.2fx overlayfs)  runs %.0f\n  folios (pages: count) %v\n",
			n, median(res[n]), median(res[n])/median(res["overlayfs"]), res[n], folioSizes(t, paths[n]))
	}
	if l, err := os.ReadFile("/proc/loadavg"); err == nil {
		fmt.Fprintf(&b, "load %s", l)
	}
	t.Log("\n" + b.String())
}
