// Package snapshotter is dupsnap's containerd snapshotter: committed
// snapshots are layer manifests (pkg/layout) over the node-wide file CAS
// (pkg/cas), unpacks write through an overlay mount into a staging dir that
// Commit ingests, and the root filesystems of views and active snapshots are
// served by detached FUSE processes (pkg/rootfs) that outlive this daemon.
//
// Root layout (shared with `dupsnap store --root`):
//
//	<root>/cas              file objects (pkg/cas)
//	<root>/manifests        layer manifests (layout.Store)
//	<root>/metadata.db      snapshot metadata (containerd's bbolt metastore)
//	<root>/diffids/         real layer diffID -> manifest key (unpack hits)
//	<root>/snapshots/<id>/  per-snapshot state, see paths.go
package snapshotter

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/continuity/fs"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/dupsnap/dupsnap/pkg/cas"
	"github.com/dupsnap/dupsnap/pkg/layout"
	"github.com/dupsnap/dupsnap/pkg/rootfs"
)

// Config configures a Snapshotter. Zero values are sane defaults.
type Config struct {
	// Root is the state directory (required).
	Root string
	// RootfsBinary is the executable started for rootfs servers
	// ("<binary> rootfs ..."); default: the running executable.
	RootfsBinary string
	// RootfsDebug turns on FUSE debug logs of rootfs servers.
	RootfsDebug bool
	// GCGrace protects objects younger than this from Cleanup (default 10m).
	GCGrace time.Duration
	// NoSync skips fsync in the CAS (tests and benchmarks only).
	NoSync bool
	// NoLowerView makes unpack snapshots with a parent use an empty lowerdir
	// instead of a read-only view of the parent chain. containerd's applier
	// only consults the lowerdirs for implied parent directories, so this
	// trades exactness of a manual mount for one FUSE server less per layer.
	NoLowerView bool
	// RegionReserve and RegionBlockSize shape the copy-on-write region of
	// each active snapshot (0: pkg/rootfs defaults); DefaultMaxSize caps a
	// region when Prepare carries no containerd.io/snapshot/max-size label
	// (0: no cap).
	RegionReserve   int64
	RegionBlockSize int
	DefaultMaxSize  int64
	// PassthroughMinSize is rootfs.Config.PassthroughMinSize of every
	// rootfs (nil: the pkg/rootfs default).
	PassthroughMinSize *int64
	// ReflinkCopyUp is rootfs.Config.ReflinkCopyUp of every active rootfs.
	ReflinkCopyUp bool
	// Fetcher, when set, is asked for a layer the node lacks before an
	// unpack is handed to containerd (dedup offloading, snapshotter/offload).
	Fetcher LayerFetcher
}

// Snapshotter implements snapshots.Snapshotter and snapshots.Cleaner.
type Snapshotter struct {
	cfg    Config
	root   string
	ms     *storage.MetaStore
	cas    *cas.Store
	layers *layout.Store

	// gcMu: Commit holds it shared from the first put of a layer until the
	// snapshot referencing its manifest is in the metastore; Cleanup holds it
	// exclusively, so it never deletes a manifest that is about to be used.
	gcMu sync.RWMutex
	// lastCollect is when Cleanup last collected CAS objects (under gcMu).
	lastCollect time.Time

	trashMu sync.Mutex     // one background delete at a time (trash.go)
	bg      sync.WaitGroup // background deletes, waited for by Close
	// removing: dirs of removed snapshots still being deleted (remove.go).
	removing removingSet

	closeOnce sync.Once
	closeErr  error
}

var (
	_ snapshots.Snapshotter = (*Snapshotter)(nil)
	_ snapshots.Cleaner     = (*Snapshotter)(nil)
)

// New opens (or creates) a snapshotter root and re-adopts the rootfs servers
// of existing active snapshots and views, restarting those that died.
func New(ctx context.Context, cfg Config) (*Snapshotter, error) {
	if cfg.Root == "" {
		return nil, fmt.Errorf("snapshotter root not set: %w", errdefs.ErrInvalidArgument)
	}
	root, err := filepath.Abs(cfg.Root)
	if err != nil {
		return nil, err
	}
	if cfg.GCGrace == 0 {
		cfg.GCGrace = 10 * time.Minute
	}
	if cfg.RootfsBinary == "" {
		if cfg.RootfsBinary, err = os.Executable(); err != nil {
			return nil, fmt.Errorf("finding rootfs binary: %w", err)
		}
	}
	for _, d := range []string{root, filepath.Join(root, "snapshots"), filepath.Join(root, "diffids")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, err
		}
	}
	c, err := cas.Open(filepath.Join(root, "cas"), cas.Options{NoSync: cfg.NoSync})
	if err != nil {
		return nil, fmt.Errorf("opening cas: %w", err)
	}
	ls, err := layout.OpenStore(filepath.Join(root, "manifests"), c)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("opening manifest store: %w", err)
	}
	ms, err := storage.NewMetaStore(filepath.Join(root, "metadata.db"))
	if err != nil {
		c.Close()
		return nil, err
	}
	s := &Snapshotter{cfg: cfg, root: root, ms: ms, cas: c, layers: ls}
	s.emptyTrash(ctx)
	if err := s.recover(ctx); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// Root is the snapshotter's state directory.
func (s *Snapshotter) Root() string { return s.root }

// CAS and Layers expose the stores (metrics, tests).
func (s *Snapshotter) CAS() *cas.Store               { return s.cas }
func (s *Snapshotter) Layers() *layout.Store         { return s.layers }
func (s *Snapshotter) MetaStore() *storage.MetaStore { return s.ms }

// Stat returns the info of a snapshot.
func (s *Snapshotter) Stat(ctx context.Context, key string) (info snapshots.Info, err error) {
	err = s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		_, info, _, err = storage.GetInfo(ctx, key)
		return err
	})
	return info, err
}

// Update updates the mutable fields (labels) of a snapshot.
func (s *Snapshotter) Update(ctx context.Context, info snapshots.Info, fieldpaths ...string) (out snapshots.Info, err error) {
	err = s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		out, err = storage.UpdateInfo(ctx, info, fieldpaths...)
		return err
	})
	return out, err
}

// Usage is cheap: committed snapshots report what was recorded at Commit
// (bytes the layer added to the store), active ones ask their writer.
func (s *Snapshotter) Usage(ctx context.Context, key string) (snapshots.Usage, error) {
	var (
		id    string
		info  snapshots.Info
		usage snapshots.Usage
		snap  storage.Snapshot
	)
	if err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		var err error
		id, info, usage, err = storage.GetInfo(ctx, key)
		if err != nil || info.Kind != snapshots.KindActive {
			return err
		}
		snap, err = storage.GetSnapshot(ctx, key)
		return err
	}); err != nil {
		return snapshots.Usage{}, err
	}
	if info.Kind != snapshots.KindActive {
		return usage, nil
	}
	p := s.paths(id)
	switch s.modeOf(id) {
	case modeStaged:
		return snapshots.Usage{}, nil
	case modeUnpack:
		du, err := fs.DiskUsage(ctx, p.upper())
		if err != nil {
			return snapshots.Usage{}, err
		}
		return snapshots.Usage(du), nil
	default:
		cfg, err := s.rootfsConfig(id, snap.ParentIDs, false)
		if err != nil {
			return snapshots.Usage{}, err
		}
		b, n, err := rootfs.Usage(cfg)
		if err != nil {
			return snapshots.Usage{}, fmt.Errorf("usage of %q: %w", key, err)
		}
		return snapshots.Usage{Size: b, Inodes: n}, nil
	}
}

// Walk calls fn for every snapshot matching the filters.
func (s *Snapshotter) Walk(ctx context.Context, fn snapshots.WalkFunc, filters ...string) error {
	return s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		return noBucketOK(storage.WalkInfo(ctx, fn, filters...))
	})
}

// noBucketOK: a fresh metastore has no buckets until the first snapshot;
// walking it is walking nothing.
func noBucketOK(err error) error {
	if errdefs.IsNotFound(err) {
		return nil
	}
	return err
}

// Mounts returns the mounts of an active snapshot or view.
func (s *Snapshotter) Mounts(ctx context.Context, key string) ([]mount.Mount, error) {
	var (
		snap storage.Snapshot
		info snapshots.Info
	)
	if err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		var err error
		snap, err = storage.GetSnapshot(ctx, key)
		if err != nil {
			return fmt.Errorf("failed to get active mount: %w", err)
		}
		_, info, _, err = storage.GetInfo(ctx, key)
		return err
	}); err != nil {
		return nil, err
	}
	return s.mounts(snap, info), nil
}

// Close releases the metadata store and CAS. Rootfs servers keep running:
// containers must survive a restart or upgrade of the daemon.
func (s *Snapshotter) Close() error {
	s.closeOnce.Do(func() {
		s.bg.Wait()
		s.closeErr = s.ms.Close()
		if err := s.cas.Close(); err != nil && s.closeErr == nil {
			s.closeErr = err
		}
	})
	return s.closeErr
}

func logKey(ctx context.Context, key string) context.Context {
	return log.WithLogger(ctx, log.G(ctx).WithField("key", key))
}
