package rootfs

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestMeasureCow prints block CoW against overlayfs, same run, same files:
// a 4 KiB overwrite in a 256 MiB image file (copy-up vs block CoW) and
// sequential write/read of a new 256 MiB file (region extents, plain
// passthrough backing file, overlayfs), plus the idle RSS of the server.
// Skipped unless DUPSNAP_ROOTFS_MEASURE=1.
func TestMeasureCow(t *testing.T) {
	needRoot(t)
	if os.Getenv("DUPSNAP_ROOTFS_MEASURE") == "" {
		t.Skip("set DUPSNAP_ROOTFS_MEASURE=1")
	}
	const size = 256 << 20
	e, layers, _ := bigImage(t, size)
	bin := dupsnapBin(t)
	mount := func(name string, plain bool) (Config, int) {
		cfg := Config{Mountpoint: filepath.Join(e.dir, name, "rootfs"), CASRoot: e.cas.Root(),
			ManifestRoot: filepath.Join(e.dir, "manifests"), Layers: layers,
			StateDir: filepath.Join(e.dir, name, "state"), PlainNewFiles: plain}
		os.MkdirAll(cfg.Mountpoint, 0o755)
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		pid, err := Start(ctx, bin, cfg, filepath.Join(e.dir, name+".log"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			sctx, c := context.WithTimeout(context.Background(), 10*time.Second)
			defer c()
			Stop(sctx, cfg.Mountpoint)
			syscall.Kill(pid, syscall.SIGKILL)
			forceUnmount(cfg.Mountpoint)
		})
		return cfg, pid
	}
	reg, pid := mount("region", false)
	plain, _ := mount("plain", true)
	rss := func() string {
		st, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		var out []string
		for _, l := range strings.Split(string(st), "\n") {
			for _, k := range []string{"VmRSS", "RssAnon", "RssFile"} {
				if strings.HasPrefix(l, k+":") {
					out = append(out, strings.Join(strings.Fields(l), " "))
				}
			}
		}
		// RssFile is the binary's text, shared by every rootfs server.
		return strings.Join(out, ", ")
	}
	time.Sleep(300 * time.Millisecond)
	t.Logf("idle RSS of a fresh rootfs server: %s", rss())

	lower := filepath.Join(e.dir, "lower")
	os.MkdirAll(lower, 0o755)
	copyTree(t, reg.Mountpoint, lower)
	ovl := filepath.Join(e.dir, "ovl")
	for _, d := range []string{ovl, ovl + "-u", ovl + "-w"} {
		os.MkdirAll(d, 0o755)
	}
	if err := syscall.Mount("overlay", ovl, "overlay", 0, "lowerdir="+lower+",upperdir="+ovl+"-u,workdir="+ovl+"-w"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Unmount(ovl, syscall.MNT_DETACH) })

	// 4 KiB overwrite in the middle of the image file: open, pwrite, close.
	overwrite := func(root string) time.Duration {
		start := time.Now()
		f, err := os.OpenFile(filepath.Join(root, "big"), os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteAt(make([]byte, 4096), size/2); err != nil {
			t.Fatal(err)
		}
		f.Close()
		return time.Since(start)
	}
	du := func(dir string) int64 {
		var n int64
		filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
			if err == nil {
				n += fi.Sys().(*syscall.Stat_t).Blocks * 512
			}
			return nil
		})
		return n
	}
	dOvl, dReg := overwrite(ovl), overwrite(reg.Mountpoint)
	f, _ := os.Open(filepath.Join(reg.Mountpoint))
	f.Sync() // commit the region so Usage sees it
	f.Close()
	usage, _, _ := Usage(reg)
	t.Logf("4 KiB overwrite in a 256 MiB image file: dupsnap %v, overlayfs copy-up %v (%.0fx); extra disk: dupsnap region %d KiB, overlayfs upper %d KiB",
		dReg, dOvl, float64(dOvl)/float64(dReg), usage>>10, du(ovl+"-u")>>10)

	// Sequential write (1 MiB writes + fsync) and read of a new file.
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i * 7)
	}
	seqWrite := func(root string) time.Duration {
		start := time.Now()
		f, err := os.Create(filepath.Join(root, "new"))
		if err != nil {
			t.Fatal(err)
		}
		for n := 0; n < size; n += len(buf) {
			if _, err := f.Write(buf); err != nil {
				t.Fatal(err)
			}
		}
		if err := f.Sync(); err != nil {
			t.Fatal(err)
		}
		f.Close()
		return time.Since(start)
	}
	seqRead := func(root string) time.Duration {
		start := time.Now()
		f, err := os.Open(filepath.Join(root, "new"))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		n := 0
		for {
			k, err := f.Read(buf)
			n += k
			if err != nil {
				break
			}
		}
		if n != size {
			t.Fatalf("read %d bytes", n)
		}
		return time.Since(start)
	}
	mb := func(d time.Duration) float64 { return float64(size>>20) / d.Seconds() }
	wO, wR, wP := seqWrite(ovl), seqWrite(reg.Mountpoint), seqWrite(plain.Mountpoint)
	rO, rR, rP := seqRead(ovl), seqRead(reg.Mountpoint), seqRead(plain.Mountpoint)
	t.Logf("new 256 MiB file, sequential write+fsync: overlayfs %.0f MB/s, dupsnap region %.0f MB/s (%.2fx), dupsnap plain backing file %.0f MB/s (%.2fx)",
		mb(wO), mb(wR), mb(wR)/mb(wO), mb(wP), mb(wP)/mb(wO))
	t.Logf("new 256 MiB file, sequential read (after reopen): overlayfs %.0f MB/s, dupsnap region %.0f MB/s (%.2fx), dupsnap plain backing file %.0f MB/s (%.2fx)",
		mb(rO), mb(rR), mb(rR)/mb(rO), mb(rP), mb(rP)/mb(rO))
	// The first read of a region file goes through the daemon; later
	// opens keep the kernel's page cache (FOPEN_KEEP_CACHE).
	rO2, rR2 := seqRead(ovl), seqRead(reg.Mountpoint)
	t.Logf("new 256 MiB file, second read: overlayfs %.0f MB/s, dupsnap region %.0f MB/s (%.2fx)", mb(rO2), mb(rR2), mb(rR2)/mb(rO2))
	time.Sleep(5 * time.Second) // two sync ticks: idle memory is returned
	t.Logf("RSS of the region rootfs server idle after the runs: %s", rss())
}
