package integration

import (
	"context"
	"errors"
	"path/filepath"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"

	"github.com/dupsnap/dupsnap/integration/harness"
)

// TestSnapshotterSuite runs containerd's own snapshotter test suite, in
// full, against a `dupsnap serve` subprocess (one per case, own root)
// through containerd's gRPC proxy client over the unix socket.
func TestSnapshotterSuite(t *testing.T) {
	harness.Require(t, harness.DupsnapBin())
	testsuite.SnapshotterSuite(t, "dupsnap", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		dir := filepath.Dir(root)
		d := &harness.Dupsnap{
			Root:    root,
			Socket:  filepath.Join(dir, "dupsnap.sock"),
			Config:  filepath.Join(dir, "dupsnap.toml"),
			LogFile: filepath.Join(dir, "dupsnap.log"),
			Bin:     harness.DupsnapBin(),
			// The suite exercises semantics, not durability: skip fsyncs.
			Args: []string{},
		}
		if err := writeFile(d.Config, "[cas]\nno_sync = true\n"); err != nil {
			return nil, nil, err
		}
		if err := d.Start(ctx); err != nil {
			return nil, nil, err
		}
		sn, closeConn, err := d.Client()
		if err != nil {
			d.Kill9()
			return nil, nil, err
		}
		cleanup := func() error {
			errC := closeConn()
			tail := ""
			if d.Proc.Exited() {
				tail = d.Tail()
			}
			d.Kill9()
			errU := harness.UnmountUnder(root)
			harness.KillMentioning(root)
			harness.ReapOrphans()
			if tail != "" {
				return errors.Join(errC, errU, errors.New("daemon died during the test:\n"+tail))
			}
			return errors.Join(errC, errU)
		}
		return sn, cleanup, nil
	})
}
