package rootfs

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

// TestMeasureInctr runs the benchmark container's own workload binary
// (integration/cmd/benchreport/inctr: `inctr randwrite BIG 2000`, random
// 4 KiB writes, then a warm-up and a timed sequential read with 1 MiB
// read(2) calls, then random reads) directly on an active rootfs served by
// a real server process and on overlayfs over the same files, alternating
// which goes first, and prints medians and ratios. Skipped unless
// DUPSNAP_INCTR names the built binary:
//
//	CGO_ENABLED=0 go build -o /tmp/inctr ./integration/cmd/benchreport/inctr
//	DUPSNAP_INCTR=/tmp/inctr go test -run TestMeasureInctr -v ./pkg/rootfs/
//
// DUPSNAP_INCTR_REPS sets the runs (default 3). DUPSNAP_INCTR_DIAG=1 adds
// per run: more warm passes, a first read after dropping the file's pages,
// the server's op counts, and the page cache folio sizes of both files
// (from /proc/kpageflags): the FUSE inode's cache is order-0 pages on
// this kernel. DUPSNAP_INCTR_EXEC=cmd runs `cmd DUPFILE OVLFILE` then
// (e.g. a script that profiles more reads with perf).
func TestMeasureInctr(t *testing.T) {
	needRoot(t)
	inctr := os.Getenv("DUPSNAP_INCTR")
	if inctr == "" {
		t.Skip("set DUPSNAP_INCTR=/path/to/inctr")
	}
	reps := 3
	fmt.Sscan(os.Getenv("DUPSNAP_INCTR_REPS"), &reps)
	diag := os.Getenv("DUPSNAP_INCTR_DIAG") != ""
	e := newEnv(t)
	body := make([]byte, measureBig)
	rand.New(rand.NewSource(1)).Read(body)
	layer := e.addLayer(t, makeTar(t, []tarEntry{{name: "big", body: string(body)}}))
	body = nil
	bin := dupsnapBin(t)

	lower := extractLower(t, e, []digest.Digest{layer})

	run := func(root string) map[string]float64 {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		out, err := exec.CommandContext(ctx, inctr, "randwrite", filepath.Join(root, "big"), "2000").Output()
		if err != nil {
			t.Fatalf("inctr on %s: %v", root, err)
		}
		m := map[string]float64{}
		if err := json.Unmarshal(out, &m); err != nil {
			t.Fatal(err)
		}
		return m
	}
	res := map[string][]float64{}
	for rep := 0; rep < reps; rep++ {
		dir := filepath.Join(e.dir, fmt.Sprint("rep", rep))
		cfg := Config{Mountpoint: filepath.Join(dir, "dupsnap", "rootfs"), CASRoot: e.cas.Root(),
			ManifestRoot: filepath.Join(e.dir, "manifests"), Layers: []digest.Digest{layer},
			StateDir: filepath.Join(dir, "dupsnap", "state")}
		os.MkdirAll(cfg.Mountpoint, 0o755)
		pid := startServer(t, bin, cfg, filepath.Join(dir, "server.log"))
		ovl := filepath.Join(dir, "ovl", "rootfs")
		overlayAt(t, lower, ovl)
		var d, o map[string]float64
		if rep%2 == 0 {
			o, d = run(ovl), run(cfg.Mountpoint)
		} else {
			d, o = run(cfg.Mountpoint), run(ovl)
		}
		for k, v := range d {
			res["dupsnap "+k] = append(res["dupsnap "+k], v)
			res["overlay "+k] = append(res["overlay "+k], o[k])
		}
		t.Logf("rep %d: seq %.0f vs %.0f MB/s, rand %.0f vs %.0f MB/s, randwrite %.0f vs %.0f IOPS", rep,
			d["mod_seq_mbps"], o["mod_seq_mbps"], d["mod_rand_mbps"], o["mod_rand_mbps"], d["randwrite_iops"], o["randwrite_iops"])
		if diag {
			diagnose(t, filepath.Join(cfg.Mountpoint, "big"), filepath.Join(ovl, "big"), pid)
		}
		syscall.Unmount(ovl, syscall.MNT_DETACH)
		os.RemoveAll(filepath.Join(dir, "ovl"))
	}
	var keys []string
	for k := range res {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&b, "%-28s median %10.1f  runs %.0f\n", k, median(res[k]), res[k])
	}
	for _, k := range []string{"mod_seq_mbps", "mod_rand_mbps", "randwrite_iops"} {
		fmt.Fprintf(&b, "ratio %-20s %.2fx\n", k, median(res["dupsnap "+k])/median(res["overlay "+k]))
	}
	if l, err := os.ReadFile("/proc/loadavg"); err == nil {
		fmt.Fprintf(&b, "load %s", l)
	}
	t.Log("\n" + b.String())
}

// diagnose prints where the time of a warm read of the modified file dup
// goes, next to the same file ovl on overlayfs.
func diagnose(t *testing.T, dup, ovl string, pid int) {
	for i := 0; i < 3; i++ {
		t.Logf("more warm passes: dupsnap %.0f overlayfs %.0f MiB/s", seqRead(t, dup, measureBig), seqRead(t, ovl, measureBig))
	}
	if f, err := os.Open(dup); err == nil {
		unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED)
		f.Close()
	}
	for i := 0; i < 3; i++ {
		t.Logf("after dropping the FUSE file's pages, pass %d: dupsnap %.0f MiB/s (overlayfs warm %.0f)", i+1, seqRead(t, dup, measureBig), seqRead(t, ovl, measureBig))
	}
	t.Logf("page cache folio sizes (pages: count): dupsnap %v, overlayfs %v", folioSizes(t, dup), folioSizes(t, ovl))
	if c := os.Getenv("DUPSNAP_INCTR_EXEC"); c != "" { // e.g. a perf record of more reads
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		out, err := exec.CommandContext(ctx, c, dup, ovl).CombinedOutput()
		cancel()
		t.Logf("%s %s: %v\n%s", c, dup, err, out)
	}
	time.Sleep(statsInterval + time.Second)
	if b, err := os.ReadFile(StatsPath(filepath.Dir(dup))); err == nil {
		var st Stats
		json.Unmarshal(b, &st)
		t.Logf("server %d ops: read %d (%.3fs), write %d, xattr %d", pid, st.Ops["read"].Count, st.Ops["read"].Seconds, st.Ops["write"].Count, st.Ops["xattr"].Count)
	}
}

var faultSink byte // keeps the page-touching loop of folioSizes

// folioSizes maps p, faults every page in and counts the page cache
// folios backing it by size in pages (/proc/self/pagemap gives the PFNs,
// /proc/kpageflags their compound head/tail bits).
func folioSizes(t *testing.T, p string) map[int]int {
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, _ := f.Stat()
	size := int(st.Size())
	m, err := unix.Mmap(int(f.Fd()), 0, size, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	for i := 0; i < size; i += 4096 {
		faultSink += m[i]
	}
	pm, err1 := os.Open("/proc/self/pagemap")
	kf, err2 := os.Open("/proc/kpageflags")
	if err1 != nil || err2 != nil {
		return nil
	}
	defer pm.Close()
	defer kf.Close()
	base := uintptr(unsafe.Pointer(&m[0])) / 4096
	hist := map[int]int{}
	run := 0
	var b [8]byte
	for i := 0; i < size/4096; i++ {
		pm.ReadAt(b[:], int64(base+uintptr(i))*8)
		pfn := binary.LittleEndian.Uint64(b[:]) & (1<<55 - 1)
		kf.ReadAt(b[:], int64(pfn)*8)
		if binary.LittleEndian.Uint64(b[:])&(1<<16) != 0 { // KPF_COMPOUND_TAIL
			run++
			continue
		}
		if run > 0 {
			hist[run]++
		}
		run = 1
	}
	hist[run]++
	return hist
}
