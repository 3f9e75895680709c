package snapshotter

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/dupsnap/dupsnap/pkg/rootfs"
)

// Active snapshots get the daemon's region settings and default quota;
// once a snapshot's rootfs config exists (written at Prepare, with any
// max-size label applied), it wins over the daemon's current config, so a
// restart with another config never changes a running container's quota.
func TestRootfsConfigRegionDefaults(t *testing.T) {
	s := newTestSnapshotter(t)
	s.cfg.RegionReserve, s.cfg.RegionBlockSize, s.cfg.DefaultMaxSize = 2<<20, 8192, 64<<20

	cfg, err := s.rootfsConfig("7", nil, false)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Reserve != 2<<20 || cfg.BlockSize != 8192 || cfg.MaxSize != 64<<20 {
		t.Fatalf("active: reserve %d block %d max %d, want the daemon defaults", cfg.Reserve, cfg.BlockSize, cfg.MaxSize)
	}
	view, err := s.rootfsConfig("8", nil, true)
	if err != nil {
		t.Fatal(err)
	}
	if view.StateDir != "" || view.MaxSize != 0 {
		t.Fatalf("view got writable state: %+v", view)
	}

	// The config written at Prepare (here: a label's 1 MiB cap) survives a
	// daemon whose defaults changed.
	cfg.MaxSize = 1 << 20
	if err := os.MkdirAll(filepath.Dir(rootfs.ConfigPath(cfg.Mountpoint)), 0o755); err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(rootfs.ConfigPath(cfg.Mountpoint), b, 0o600); err != nil {
		t.Fatal(err)
	}
	s.cfg.DefaultMaxSize = 0
	again, err := s.rootfsConfig("7", nil, false)
	if err != nil {
		t.Fatal(err)
	}
	if again.MaxSize != 1<<20 || again.Reserve != 2<<20 {
		t.Fatalf("after restart: max %d reserve %d, want the snapshot's own 1 MiB / 2 MiB", again.MaxSize, again.Reserve)
	}
}
