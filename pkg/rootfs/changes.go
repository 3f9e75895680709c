package rootfs

import (
	"context"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"

	"github.com/dupsnap/dupsnap/pkg/cas"
	"github.com/dupsnap/dupsnap/pkg/layout"
)

// Changes returns a manifest of the modifications of an active snapshot
// relative to its layers: the upper dir is in overlay format already
// (whiteouts, opaque dirs, full content of new and modified files), so
// layout.FromDir turns it into a layer. It reads only the state dir and
// works whether or not the rootfs is mounted; for a consistent result the
// container should not be writing.
func Changes(ctx context.Context, cfg Config, b *cas.Batch) (*layout.Manifest, error) {
	up := cfg.upperDir()
	if up == "" {
		return nil, fmt.Errorf("rootfs: changes of %s: not an active snapshot", cfg.Mountpoint)
	}
	if err := os.MkdirAll(up, 0o755); err != nil {
		return nil, fmt.Errorf("rootfs: changes: %w", err)
	}
	m, err := layout.FromDir(ctx, b, up)
	if err != nil {
		return nil, fmt.Errorf("rootfs: changes of %s: %w", cfg.StateDir, err)
	}
	return m, nil
}

// Usage returns bytes and inodes used by the writable state. It walks the
// state dir only (the container's own changes), never image content.
func Usage(cfg Config) (bytes int64, inodes int64, err error) {
	if cfg.StateDir == "" {
		return 0, 0, nil
	}
	seen := map[uint64]bool{}
	err = filepath.WalkDir(cfg.StateDir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if os.IsNotExist(err) {
				return nil
			}
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return nil
		}
		st, ok := fi.Sys().(*syscall.Stat_t)
		if !ok || seen[st.Ino] {
			return nil
		}
		if st.Nlink > 1 {
			seen[st.Ino] = true
		}
		inodes++
		bytes += st.Blocks * 512
		return nil
	})
	if err != nil {
		return 0, 0, fmt.Errorf("rootfs: usage of %s: %w", cfg.StateDir, err)
	}
	return bytes, inodes, nil
}
