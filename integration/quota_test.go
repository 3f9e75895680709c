package integration

import (
	"context"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestQuota runs a container whose snapshot carries containerd's
// max-size label: inside, statfs reports the cap and writes stop at it
// with ENOSPC; a container without the label, started next, writes past
// that size unaffected.
func TestQuota(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 150*time.Second)
	defer cancel()
	e := newEnv(ctx, t)
	ti := buildImages(t)
	ref, err := e.reg.Push(ctx, "quota/one:v1", ti.img1)
	if err != nil {
		t.Fatal(err)
	}
	e.pull(ctx, t, "dupsnap", ref)

	const capBytes = 8 << 20
	// df -k prints total and available 1K blocks; dd reports what it wrote
	// before the error. The script never fails itself: the test reads it.
	script := `df -k /; dd if=/dev/zero of=/fill bs=64k count=1000 conv=fsync 2>&1; echo "rc=$?"; ls -l /fill; echo DONE`
	args := append([]string{"run", "--rm", "--snapshotter", "dupsnap",
		"--snapshotter-label", "containerd.io/snapshot/max-size=" + strconv.Itoa(capBytes)}, e.c.RunArgs()...)
	args = append(args, ref, "capped", "/bin/sh", "-c", script)
	out, err := e.c.Ctr(ctx, 90*time.Second, args...)
	if err != nil || !strings.Contains(out, "DONE") {
		t.Fatalf("capped container: %v\n%s", err, out)
	}
	t.Logf("capped container:\n%s", out)
	if !strings.Contains(out, "No space left on device") || strings.Contains(out, "rc=0") {
		t.Errorf("writing 64 MiB under an 8 MiB cap did not fail with ENOSPC")
	}
	total := dfTotalKiB(t, out)
	if total <= 0 || total > capBytes/1024 {
		t.Errorf("statfs inside the capped rootfs reports %d KiB, want at most the cap %d KiB", total, capBytes/1024)
	}

	// Another container, no cap: the same write succeeds.
	out, err = e.run(ctx, t, ref, "uncapped", `dd if=/dev/zero of=/fill bs=64k count=400 conv=fsync 2>&1 && echo WROTE`)
	if err != nil || !strings.Contains(out, "WROTE") {
		t.Fatalf("uncapped container could not write 25 MiB: %v\n%s", err, out)
	}
}

// dfTotalKiB picks the total-blocks column of the df line ("fs total used avail use% mnt").
func dfTotalKiB(t *testing.T, out string) int {
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) == 6 && f[5] == "/" {
			n, err := strconv.Atoi(f[1])
			if err == nil {
				return n
			}
		}
	}
	t.Errorf("no df line for / in:\n%s", out)
	return -1
}
