package integration

import (
	"context"
	"io"
	"math/rand"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/dupsnap/dupsnap/integration/harness"
)

// TestDaemonCrashDuringPull kills -9 the daemon (durable store, fsyncs on)
// at random moments of pulls, several times. Afterwards the store passes
// fsck, the same images pull again, and containers see every image file
// with the right content: a crash never corrupts the store or leaves a
// committed layer incomplete.
func TestDaemonCrashDuringPull(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Second)
	defer cancel()
	harness.Require(t, harness.DupsnapBin())
	dir := harness.TempDir(t, "dscrash-")
	d := harness.StartDupsnap(ctx, t, dir, "") // durable: the default config
	c := harness.StartContainerd(ctx, t, dir, harness.ContainerdOptions{DupsnapSocket: d.Socket, DupsnapRoot: d.Root})
	reg := harness.StartRegistry(ctx, t, dir)
	e := &env{dir: dir, d: d, c: c, reg: reg}
	t.Cleanup(func() {
		if t.Failed() {
			t.Log(d.Tail())
		}
	})
	ti := buildImages(t)
	var refs []string
	for i, img := range []v1.Image{ti.img1, ti.img2} {
		ref, err := reg.Push(ctx, "crash/img"+string(rune('a'+i))+":v1", img)
		if err != nil {
			t.Fatal(err)
		}
		refs = append(refs, ref)
	}

	rng := rand.New(rand.NewSource(time.Now().UnixNano()))
	for round := 0; round < 6; round++ {
		ref := refs[round%len(refs)]
		logSize := fileSize(d.LogFile)
		done := make(chan error, 1)
		go func() {
			_, err := c.Ctr(ctx, time.Minute, "image", "pull", "--plain-http", "--snapshotter", "dupsnap", ref)
			done <- err
		}()
		// Kill right after the daemon reaches a point of the unpack: a layer's
		// staging snapshot created, or a layer committed; plus a random delay
		// of up to 30 ms to land inside the following work.
		trigger := []string{"snapshot created", "msg=committed"}[round%2]
		var err error
		how := "killed after " + strconv.Quote(trigger)
		select {
		case <-waitLog(ctx, d.LogFile, logSize, trigger):
			time.Sleep(time.Duration(rng.Intn(30)) * time.Millisecond)
			d.Kill9()
			err = <-done // fails (daemon gone) or finished before the kill
		case err = <-done: // the pull ended first: kill an idle daemon
			how = "pull ended before " + strconv.Quote(trigger) + ", then killed"
			d.Kill9()
		}
		t.Logf("round %d: %s; pull of %s ended with %v", round, how, ref, err)
		if err := d.Start(ctx); err != nil {
			t.Fatal(err)
		}
		// containerd's gRPC channel to the plugin backs off (up to 3 s)
		// after the daemon vanished: wait until a call reaches the new one.
		probe := "probe-" + strconv.Itoa(round)
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(200 * time.Millisecond) {
			if _, err := c.Ctr(ctx, 10*time.Second, "snapshots", "--snapshotter", "dupsnap", "prepare", probe); err == nil {
				c.Ctr(ctx, 10*time.Second, "snapshots", "--snapshotter", "dupsnap", "rm", probe)
				break
			} else if time.Now().After(deadline) {
				t.Fatalf("containerd never reconnected to the restarted daemon: %v", err)
			}
		}
		// Drop what containerd has, so the next round unpacks again.
		c.Ctr(ctx, time.Minute, "image", "rm", "--sync", ref)
	}

	out, err := harness.Run(ctx, time.Minute, nil, harness.DupsnapBin(), "store", "fsck", "--root", d.Root)
	if err != nil {
		t.Fatalf("store fsck after crashes: %v\n%s", err, out)
	}
	t.Logf("fsck: %s", strings.TrimSpace(out))

	for i, ref := range refs {
		e.pull(ctx, t, "dupsnap", ref)
		out, err := e.run(ctx, t, ref, "verify"+string(rune('a'+i)), "sha256sum -c --quiet /checks.sha256 && echo ALLOK")
		if err != nil || !strings.Contains(out, "ALLOK") {
			t.Fatalf("container on %s after crashes: %v\n%s", ref, err, out)
		}
	}
}

func fileSize(p string) int64 {
	st, err := os.Stat(p)
	if err != nil {
		return 0
	}
	return st.Size()
}

// waitLog polls the log file, from offset on, and closes the returned
// channel once it contains s (never, if ctx ends first).
func waitLog(ctx context.Context, path string, offset int64, s string) <-chan struct{} {
	found := make(chan struct{})
	go func() {
		for ctx.Err() == nil {
			if f, err := os.Open(path); err == nil {
				b, _ := io.ReadAll(io.NewSectionReader(f, offset, 1<<30))
				f.Close()
				if strings.Contains(string(b), s) {
					close(found)
					return
				}
			}
			time.Sleep(2 * time.Millisecond)
		}
	}()
	return found
}
