package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/dupsnap/dupsnap/pkg/rootfs"
)

// layersOf returns the manifest keys of a parent chain, bottom first.
// parentIDs is as storage returns it: immediate parent first.
func (s *Snapshotter) layersOf(parentIDs []string) ([]digest.Digest, error) {
	layers := make([]digest.Digest, 0, len(parentIDs))
	for i := len(parentIDs) - 1; i >= 0; i-- {
		k, err := s.manifestKey(parentIDs[i])
		if err != nil {
			return nil, fmt.Errorf("layer of parent snapshot %s: %w", parentIDs[i], err)
		}
		layers = append(layers, k)
	}
	return layers, nil
}

// maxSizeLabel caps an active snapshot's region (its quota).
const maxSizeLabel = "containerd.io/snapshot/max-size"

// rootfsConfig describes the rootfs server of snapshot id.
func (s *Snapshotter) rootfsConfig(id string, parentIDs []string, readOnly bool) (rootfs.Config, error) {
	layers, err := s.layersOf(parentIDs)
	if err != nil {
		return rootfs.Config{}, err
	}
	p := s.paths(id)
	cfg := rootfs.Config{
		Mountpoint:   p.mnt(),
		CASRoot:      filepath.Join(s.root, "cas"),
		ManifestRoot: filepath.Join(s.root, "manifests"),
		Layers:       layers,
		ReadOnly:     readOnly,
		Debug:        s.cfg.RootfsDebug,
		// A live server keeps the threshold it started with (rootfs.json).
		PassthroughMinSize: s.cfg.PassthroughMinSize,
	}
	if !readOnly {
		cfg.StateDir = p.state()
		cfg.Reserve, cfg.BlockSize, cfg.MaxSize = s.cfg.RegionReserve, s.cfg.RegionBlockSize, s.cfg.DefaultMaxSize
		cfg.ReflinkCopyUp = s.cfg.ReflinkCopyUp
		// The region settings and quota chosen at Prepare (maxSizeLabel)
		// live on in the config that rootfs.Start wrote then (restart,
		// Usage), whatever the daemon's config says now.
		if old, err := rootfs.LoadConfig(rootfs.ConfigPath(cfg.Mountpoint)); err == nil {
			cfg.Reserve, cfg.BlockSize, cfg.MaxSize = old.Reserve, old.BlockSize, old.MaxSize
		}
	}
	return cfg, nil
}

// startRootfs mounts cfg unless a live server already serves it. A dead
// server's mount ("transport endpoint is not connected") is detached first.
func (s *Snapshotter) startRootfs(ctx context.Context, cfg rootfs.Config, logFile string) error {
	if rootfs.Alive(cfg.Mountpoint) {
		return nil
	}
	detachStale(ctx, cfg.Mountpoint)
	if err := os.MkdirAll(cfg.Mountpoint, 0o755); err != nil {
		return err
	}
	if cfg.StateDir != "" {
		if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
			return err
		}
	}
	t0 := time.Now()
	pid, err := rootfs.StartSpare(ctx, s.cfg.RootfsBinary, cfg, logFile)
	if err != nil {
		return fmt.Errorf("starting rootfs server at %s (log %s): %w", cfg.Mountpoint, logFile, err)
	}
	log.G(ctx).WithField("pid", pid).WithField("mountpoint", cfg.Mountpoint).
		WithField("took", time.Since(t0).Round(10*time.Microsecond)).Debug("rootfs server started")
	rootfsStarts.Inc()
	return nil
}

// stopRootfs stops the server at mountpoint if one is there. Every caller
// (Remove, Commit, Cleanup) deletes the snapshot's state right after, so
// the server is discarded, not left to sync it.
func (s *Snapshotter) stopRootfs(ctx context.Context, mountpoint string) error {
	wait, err := s.stopRootfsBegin(ctx, mountpoint)
	wait(ctx)
	return err
}

// stopRootfsBegin unmounts (or detaches) mountpoint and kills its server;
// wait finishes the stop (the server's exit, stale mounts). A caller may
// delete the snapshot's files only after wait.
func (s *Snapshotter) stopRootfsBegin(ctx context.Context, mountpoint string) (wait func(context.Context), _ error) {
	nop := func(context.Context) {}
	if _, err := os.Lstat(mountpoint); errors.Is(err, os.ErrNotExist) {
		return nop, nil
	}
	mps, _ := mountsUnder(mountpoint)
	if len(mps) == 0 && !rootfs.Alive(mountpoint) {
		return nop, nil
	}
	t0 := time.Now()
	rwait, err := rootfs.DiscardBegin(ctx, mountpoint)
	if err != nil {
		log.G(ctx).WithError(err).WithField("mountpoint", mountpoint).Warn("rootfs stop failed, detaching")
		rwait = nop
	}
	began := time.Since(t0)
	return func(ctx context.Context) {
		rwait(ctx)
		detachStale(ctx, mountpoint)
		log.G(ctx).WithField("mountpoint", mountpoint).WithField("unmounted", began.Round(10*time.Microsecond)).
			WithField("took", time.Since(t0).Round(10*time.Microsecond)).Debug("rootfs server stopped")
	}, nil
}

func detachStale(ctx context.Context, mountpoint string) {
	mps, _ := mountsUnder(mountpoint)
	for _, mp := range mps {
		if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil {
			log.G(ctx).WithError(err).WithField("mountpoint", mp).Warn("detaching stale mount")
		}
	}
}

// mounts builds what Prepare/View/Mounts return for a snapshot.
func (s *Snapshotter) mounts(snap storage.Snapshot, info snapshots.Info) []mount.Mount {
	p := s.paths(snap.ID)
	if snap.Kind == snapshots.KindActive {
		switch s.modeOf(snap.ID) {
		case modeStaged:
			// A read-only last mount tells containerd's unpacker the layer
			// is staged: it skips fetch and apply and just commits.
			return []mount.Mount{{Type: "bind", Source: p.upper(), Options: []string{"rbind", "ro"}}}
		case modeUnpack:
			lower := s.emptyDir()
			if len(snap.ParentIDs) > 0 && !s.cfg.NoLowerView {
				lower = p.lower()
			}
			return []mount.Mount{{
				Type:   "overlay",
				Source: "overlay",
				Options: []string{
					"index=off",
					"workdir=" + p.work(),
					"upperdir=" + p.upper(),
					"lowerdir=" + lower,
				},
			}}
		}
	}
	rw := "rw"
	if snap.Kind == snapshots.KindView {
		rw = "ro"
	}
	return []mount.Mount{{Type: "bind", Source: p.mnt(), Options: []string{"rbind", rw}}}
}

func (s *Snapshotter) emptyDir() string { return filepath.Join(s.root, "empty") }

// recover re-adopts rootfs servers after a daemon (re)start: live mounts
// are kept as they are, dead ones are restarted from their state dir.
func (s *Snapshotter) recover(ctx context.Context) error {
	if err := os.MkdirAll(s.emptyDir(), 0o755); err != nil {
		return err
	}
	type item struct {
		key  string
		snap storage.Snapshot
	}
	var items []item
	if err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		return noBucketOK(storage.WalkInfo(ctx, func(ctx context.Context, info snapshots.Info) error {
			if info.Kind == snapshots.KindCommitted {
				return nil
			}
			snap, err := storage.GetSnapshot(ctx, info.Name)
			if err != nil {
				return err
			}
			items = append(items, item{info.Name, snap})
			return nil
		}))
	}); err != nil {
		return fmt.Errorf("listing snapshots: %w", err)
	}
	adopted, restarted := 0, 0
	for _, it := range items {
		ctx := logKey(ctx, it.key)
		p := s.paths(it.snap.ID)
		var (
			cfg     rootfs.Config
			err     error
			logFile = p.log()
		)
		switch s.modeOf(it.snap.ID) {
		case modeStaged:
			continue
		case modeUnpack:
			if len(it.snap.ParentIDs) == 0 || s.cfg.NoLowerView {
				continue
			}
			cfg, err = s.rootfsConfig(it.snap.ID, it.snap.ParentIDs, true)
			cfg.Mountpoint, logFile = p.lower(), p.lowerLog()
		default:
			cfg, err = s.rootfsConfig(it.snap.ID, it.snap.ParentIDs, it.snap.Kind == snapshots.KindView)
		}
		if err != nil {
			log.G(ctx).WithError(err).Error("cannot recover rootfs")
			continue
		}
		if rootfs.Alive(cfg.Mountpoint) {
			adopted++
			continue
		}
		if err := s.startRootfs(ctx, cfg, logFile); err != nil {
			log.G(ctx).WithError(err).Error("restarting rootfs server")
			continue
		}
		restarted++
	}
	log.G(ctx).WithField("adopted", adopted).WithField("restarted", restarted).Info("rootfs servers recovered")
	return nil
}

// aliveCount counts the rootfs servers of existing snapshots (metrics).
func (s *Snapshotter) aliveCount(ctx context.Context) int {
	return len(s.liveMounts(ctx))
}

// liveMounts lists the mountpoints of existing snapshots whose rootfs
// server is alive (container rootfs and unpack lower views).
func (s *Snapshotter) liveMounts(ctx context.Context) (mps []string) {
	ids := map[string]struct{}{}
	_ = s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		m, err := storage.IDMap(ctx)
		for id := range m {
			ids[id] = struct{}{}
		}
		return noBucketOK(err)
	})
	for id := range ids {
		if _, err := strconv.ParseUint(id, 10, 64); err != nil {
			continue
		}
		p := s.paths(id)
		for _, mp := range []string{p.mnt(), p.lower()} {
			if _, err := os.Lstat(mp); err == nil && rootfs.Alive(mp) {
				mps = append(mps, mp)
			}
		}
	}
	return mps
}

// treeWarmDelay: a pull commits its layers one on top of the other; a
// chain nothing is committed on within this delay (an image's top) gets
// its rootfs tree built in the background, so that even the image's first
// container starts without merging manifests (see rootfs.WarmTree). Long
// enough that a layer whose successor is still downloading or unpacking
// (not just applying) is rarely built for nothing while the pull needs
// the CPU.
const treeWarmDelay = time.Second

// treeWarm holds the pending builds by committed snapshot ID.
var treeWarm struct {
	mu      sync.Mutex
	pending map[string]func()
}

// warmTreeLater schedules the tree of committed snapshot id (parentIDs:
// its parents, immediate first) and cancels that of its parent. Close
// waits for it (s.bg).
func (s *Snapshotter) warmTreeLater(ctx context.Context, id string, parentIDs []string) {
	layers, err := s.layersOf(append([]string{id}, parentIDs...))
	if err != nil {
		return
	}
	ctx = context.WithoutCancel(ctx)
	treeWarm.mu.Lock()
	defer treeWarm.mu.Unlock()
	if treeWarm.pending == nil {
		treeWarm.pending = map[string]func(){}
	}
	if len(parentIDs) > 0 {
		if cancel := treeWarm.pending[parentIDs[0]]; cancel != nil {
			cancel()
		}
	}
	s.bg.Add(1)
	var once sync.Once
	done := func() { once.Do(s.bg.Done) }
	tm := time.AfterFunc(treeWarmDelay, func() {
		defer done()
		treeWarm.mu.Lock()
		delete(treeWarm.pending, id)
		treeWarm.mu.Unlock()
		if err := rootfs.WarmTree(ctx, s.layers, layers); err != nil {
			log.G(ctx).WithError(err).Debug("rootfs tree not prebuilt")
			return
		}
		// The image just pulled is the likeliest to start next.
		rootfs.PrepareSpare(s.cfg.RootfsBinary, rootfs.Config{
			CASRoot: filepath.Join(s.root, "cas"), ManifestRoot: filepath.Join(s.root, "manifests"), Layers: layers})
	})
	treeWarm.pending[id] = func() {
		delete(treeWarm.pending, id)
		if tm.Stop() {
			done()
		}
	}
}
