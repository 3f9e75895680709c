// Package rootfs serves the root filesystem of one container (or one
// read-only view) with FUSE: the merged layer manifests of an image, clean
// files passed through to their CAS objects, and, for active snapshots, the
// container's own writes kept in a state directory.
//
// Writable state (StateDir): the namespace and metadata of the container's
// changes are an overlay-format upper dir (names, whiteouts, opaque dirs,
// mode, owner, times, xattrs, hard links); file data is in a pkg/cow region
// (StateDir/region). A modified image file's upper entry is an empty
// placeholder whose trusted.dupsnap.cow xattr names its region file and
// base CAS object: copy-up copies metadata only, and a write stores just
// the touched blocks. Files the container creates are region files too
// (quota, O(1) usage, one journal for crash consistency). fsync of a
// region file commits the region, the placeholder and, after a copy-up or
// create, the upper dirs naming it; the server also commits every
// syncInterval. Clean image files stay passthrough to their CAS objects.
//
// One rootfs is served by one process (`dupsnap rootfs --config FILE`),
// detached from the snapshotter daemon so that the daemon can die or be
// upgraded without breaking running containers (see Start, Stop, Alive).
package rootfs

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"

	"github.com/opencontainers/go-digest"
)

// Config describes one rootfs.
type Config struct {
	Mountpoint   string          `json:"mountpoint"`    // where the FUSE fs is mounted (exists, empty dir)
	CASRoot      string          `json:"cas_root"`      // node CAS root (cas.Open(CASRoot, cas.Options{}))
	ManifestRoot string          `json:"manifest_root"` // layout.Store dir (layout.OpenStore)
	Layers       []digest.Digest `json:"layers"`        // manifest keys (diffIDs) bottom first; may be empty
	StateDir     string          `json:"state_dir"`     // writable state of an active snapshot; "" for a read-only view
	ReadOnly     bool            `json:"read_only"`     // views: every write fails with EROFS
	Debug        bool            `json:"debug"`

	// ready, if set, is closed once Serve's mount is fully set up (in
	// particular after go-fuse's poll hack), for in-process callers: see
	// Serve.
	ready chan<- struct{}
	// onFS, tests only: gets the served rootFS before the mount.
	onFS func(*rootFS)

	// Writable state (active snapshots only). The container's file data
	// lives in a pkg/cow region under StateDir/region.
	//
	// MaxSize caps the region (the snapshot's quota, label
	// containerd.io/snapshot/max-size); past it writes fail with ENOSPC
	// and statfs inside the rootfs reports it. 0: no cap.
	MaxSize int64 `json:"max_size,omitempty"`
	// Reserve is preallocated when the region is created (0: 256 KiB, then
	// growth in 16 MiB steps); the region grows on demand up to MaxSize.
	Reserve int64 `json:"reserve,omitempty"`
	// BlockSize is the CoW unit of a new region (0: 4 KiB).
	BlockSize int `json:"block_size,omitempty"`
	// PlainNewFiles stores files the container creates as plain upper
	// files with passthrough instead of region extents (measurement knob:
	// such files bypass the quota and Usage).
	PlainNewFiles bool `json:"plain_new_files,omitempty"`

	// PassthroughMinSize: clean image files at least this large are
	// opened with FUSE passthrough to their CAS object; smaller ones are
	// served as ordinary cached FUSE files (see openSmall). nil: the
	// default, DefaultPassthroughMinSize; 0: every file passthrough.
	PassthroughMinSize *int64 `json:"passthrough_min_size,omitempty"`

	// ReflinkCopyUp: the first write to an image file clones its CAS
	// object into a plain passthrough upper file where the filesystem can
	// (xfs, btrfs; see reflink.go) instead of using the region. Ignored
	// with a MaxSize cap; such files are not counted by Usage.
	ReflinkCopyUp bool `json:"reflink_copy_up,omitempty"`
}

// ptMin is the effective PassthroughMinSize.
func (c *Config) ptMin() int64 {
	if c.PassthroughMinSize == nil {
		return DefaultPassthroughMinSize
	}
	return *c.PassthroughMinSize
}

// regionDir holds the cow region of an active snapshot.
func (c *Config) regionDir() string {
	if c.StateDir == "" {
		return ""
	}
	return filepath.Join(c.StateDir, "region")
}

// Files next to the mountpoint: Stop and Alive only get the mountpoint, so
// everything they need must be derivable from it.
const (
	configName = "rootfs.json"
	pidName    = "rootfs.pid"
	// FSType is the type a dupsnap rootfs shows in /proc/self/mountinfo.
	FSType = "fuse.dupsnap"
)

// ConfigPath is where Start writes the config of the rootfs at mountpoint.
func ConfigPath(mountpoint string) string {
	return filepath.Join(filepath.Dir(filepath.Clean(mountpoint)), configName)
}

func pidPath(mountpoint string) string {
	return filepath.Join(filepath.Dir(filepath.Clean(mountpoint)), pidName)
}

// upperDir holds the overlay-format changes of an active snapshot.
func (c *Config) upperDir() string {
	if c.StateDir == "" {
		return ""
	}
	return filepath.Join(c.StateDir, "upper")
}

// workDir holds temporary files of copy-up (same filesystem as upper, so
// that a finished copy is renamed into place atomically).
func (c *Config) workDir() string {
	if c.StateDir == "" {
		return ""
	}
	return filepath.Join(c.StateDir, "work")
}

func (c *Config) validate() error {
	if c.Mountpoint == "" || !filepath.IsAbs(c.Mountpoint) {
		return fmt.Errorf("rootfs: mountpoint %q must be an absolute path", c.Mountpoint)
	}
	if c.CASRoot == "" || c.ManifestRoot == "" {
		return fmt.Errorf("rootfs: cas_root and manifest_root are required")
	}
	if c.StateDir == "" && !c.ReadOnly {
		return fmt.Errorf("rootfs: a rootfs without state_dir must be read_only")
	}
	return nil
}

// LoadConfig reads a config written by Start (or by hand).
func LoadConfig(path string) (Config, error) {
	var c Config
	b, err := os.ReadFile(path)
	if err != nil {
		return c, fmt.Errorf("rootfs: read config: %w", err)
	}
	if err := json.Unmarshal(b, &c); err != nil {
		return c, fmt.Errorf("rootfs: parse config %s: %w", path, err)
	}
	return c, c.validate()
}

// writeConfig stores c atomically (a restarted daemon re-reads it).
func writeConfig(path string, c Config) error {
	b, err := json.MarshalIndent(c, "", "  ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("rootfs: write config: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("rootfs: write config: %w", err)
	}
	return nil
}

// DefaultPassthroughMinSize is the PassthroughMinSize of a Config that
// sets none.
const DefaultPassthroughMinSize = 256 << 10
