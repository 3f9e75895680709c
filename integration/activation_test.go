package integration

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/dupsnap/dupsnap/integration/harness"
)

// TestSocketActivation: with the socket held outside the daemon (as
// systemd's dupsnap.socket holds it), a snapshot call that containerd makes
// while the daemon is dead waits and succeeds once a new daemon serves,
// instead of failing with "connection refused" and backing containerd's
// channel off (what TestDaemonCrashDuringPull has to wait out without it).
func TestSocketActivation(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 150*time.Second)
	defer cancel()
	harness.Require(t, harness.DupsnapBin())
	dir := harness.TempDir(t, "activ-")
	d := harness.StartDupsnapActivated(ctx, t, dir, "")
	c := harness.StartContainerd(ctx, t, dir, harness.ContainerdOptions{DupsnapSocket: d.Socket, DupsnapRoot: d.Root})
	t.Cleanup(func() {
		if t.Failed() {
			t.Log(d.Tail())
		}
	})
	snap := func(args ...string) (string, error) {
		return c.Ctr(ctx, 60*time.Second, append([]string{"snapshots", "--snapshotter", "dupsnap"}, args...)...)
	}
	if _, err := snap("prepare", "before"); err != nil {
		t.Fatal(err)
	}
	keys := []string{"before"}
	for round := 0; round < 2; round++ {
		d.Kill9()
		key := fmt.Sprintf("during-%d", round)
		done := make(chan error, 1)
		go func() {
			_, err := snap("prepare", key)
			done <- err
		}()
		select {
		case err := <-done:
			t.Fatalf("round %d: a call made while the daemon was down ended before a daemon was back: %v", round, err)
		case <-time.After(700 * time.Millisecond):
		}
		t0 := time.Now()
		if err := d.Start(ctx); err != nil {
			t.Fatal(err)
		}
		if err := <-done; err != nil {
			t.Fatalf("round %d: the call made while the daemon was down failed: %v", round, err)
		}
		t.Logf("round %d: the call made while the daemon was down succeeded %v after the restart began", round, time.Since(t0).Round(time.Millisecond))
		keys = append(keys, key)
	}
	out, err := snap("ls")
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		if !strings.Contains(out, k) {
			t.Errorf("snapshot %s missing after the restarts:\n%s", k, out)
		}
	}
	for _, k := range keys {
		if _, err := snap("rm", k); err != nil {
			t.Errorf("rm %s: %v", k, err)
		}
	}
}
