package snapshotter

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/dupsnap/dupsnap/internal/phases"
	"github.com/dupsnap/dupsnap/pkg/layout"
)

// labelParentChainID is set by containerd's unpacker on every layer but the
// first (core/unpack/unpacker.go); with parallel unpack it is the only hint
// of the parent at Prepare time.
const labelParentChainID = "containerd.io/snapshot/parent-chain-id"

// Prepare creates an active snapshot. With label containerd.io/snapshot.ref
// it is an unpack: the layer may already be on the node (ErrAlreadyExists or
// a staged read-only mount), else the applier gets an overlay staging mount.
func (s *Snapshotter) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	defer observe("prepare", time.Now())
	return s.create(ctx, snapshots.KindActive, key, parent, opts)
}

// View creates a read-only snapshot of parent served by a rootfs process.
func (s *Snapshotter) View(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	defer observe("view", time.Now())
	return s.create(ctx, snapshots.KindView, key, parent, opts)
}

func (s *Snapshotter) create(ctx context.Context, kind snapshots.Kind, key, parent string, opts []snapshots.Opt) (_ []mount.Mount, retErr error) {
	ctx = logKey(ctx, key)
	ph := phases.Start(time.Now())
	var base snapshots.Info
	for _, o := range opts {
		if err := o(&base); err != nil {
			return nil, err
		}
	}
	target := base.Labels[snapshots.LabelSnapshotRef]
	unpack := kind == snapshots.KindActive && target != ""
	mode := modeRootfs
	var known digest.Digest
	if unpack {
		mode = modeUnpack
		if found, err := s.findCommitted(ctx, target, parent); err != nil {
			return nil, err
		} else if found {
			unpackHits.WithLabelValues("chain").Inc()
			return nil, fmt.Errorf("target snapshot %q: %w", target, errdefs.ErrAlreadyExists)
		}
		k, ok := s.lookupLayer(digest.Digest(base.Labels[snapshots.LabelSnapshotDiffID]))
		if !ok && s.cfg.Fetcher != nil && s.fetchLayer(ctx, base.Labels) {
			k, ok = s.lookupLayer(digest.Digest(base.Labels[snapshots.LabelSnapshotDiffID]))
		}
		if ok {
			known = k
			if parent != "" || base.Labels[labelParentChainID] == "" {
				// The parent is known now: commit at once under the target
				// name; containerd finds it by label and parent.
				if err := s.commitKnown(ctx, key, target, parent, known, opts); err != nil {
					return nil, err
				}
				unpackHits.WithLabelValues("layer").Inc()
				return nil, fmt.Errorf("target snapshot %q: %w", target, errdefs.ErrAlreadyExists)
			}
			// Parallel unpack: the parent arrives only at Commit, so hand
			// out a staged (read-only) snapshot and commit the known layer then.
			mode = modeStaged
			unpackHits.WithLabelValues("staged").Inc()
		}
	}

	ph.Mark("lookup")
	var (
		snap storage.Snapshot
		info snapshots.Info
	)
	if err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		var err error
		snap, err = storage.CreateSnapshot(ctx, kind, key, parent, opts...)
		if err != nil {
			return fmt.Errorf("failed to create snapshot: %w", err)
		}
		_, info, _, err = storage.GetInfo(ctx, key)
		if err != nil {
			return err
		}
		return s.makeDirs(snap.ID, mode, known)
	}); err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			if err := s.Remove(context.WithoutCancel(ctx), key); err != nil {
				log.G(ctx).WithError(err).Warn("removing failed snapshot")
			}
		}
	}()

	ph.Mark("metastore")
	// Servers start outside the metadata transaction so that one slow mount
	// does not hold the database for everybody.
	switch mode {
	case modeUnpack:
		if len(snap.ParentIDs) > 0 && !s.cfg.NoLowerView {
			cfg, err := s.rootfsConfig(snap.ID, snap.ParentIDs, true)
			if err != nil {
				return nil, err
			}
			p := s.paths(snap.ID)
			cfg.Mountpoint = p.lower()
			if err := s.startRootfs(ctx, cfg, p.lowerLog()); err != nil {
				return nil, err
			}
		}
	case modeRootfs:
		cfg, err := s.rootfsConfig(snap.ID, snap.ParentIDs, kind == snapshots.KindView)
		if err != nil {
			return nil, err
		}
		if v := info.Labels[maxSizeLabel]; v != "" && !cfg.ReadOnly {
			if cfg.MaxSize, err = strconv.ParseInt(v, 10, 64); err != nil || cfg.MaxSize < 0 {
				return nil, fmt.Errorf("label %s=%q: %w", maxSizeLabel, v, errdefs.ErrInvalidArgument)
			}
		}
		if err := s.startRootfs(ctx, cfg, s.paths(snap.ID).log()); err != nil {
			return nil, err
		}
	}
	ph.Mark("servers")
	log.G(ctx).WithField("id", snap.ID).WithField("parent", parent).WithField("mode", mode).
		WithField("phases", ph.String()).Debug("snapshot created")
	return s.mounts(snap, info), nil
}

func (s *Snapshotter) makeDirs(id string, mode snapMode, known digest.Digest) error {
	p := s.paths(id)
	// A leftover dir of the same id (crash between metastore and disk) is stale.
	if err := removeDir(p.dir()); err != nil {
		return err
	}
	if err := os.MkdirAll(p.dir(), 0o700); err != nil {
		return err
	}
	switch mode {
	case modeStaged:
		if err := os.Mkdir(p.upper(), 0o755); err != nil {
			return err
		}
		return writeFileAtomic(p.staged(), []byte(known.String()+"\n"))
	case modeUnpack:
		if err := os.Mkdir(p.upper(), 0o755); err != nil {
			return err
		}
		return os.Mkdir(p.work(), 0o700)
	}
	return nil
}

// findCommitted reports whether a committed snapshot for target with this
// parent exists (containerd then finds it by the same filter).
func (s *Snapshotter) findCommitted(ctx context.Context, target, parent string) (found bool, err error) {
	filter := fmt.Sprintf(`labels.%q==%s,parent==%q`, snapshots.LabelSnapshotRef, target, parent)
	err = s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		return noBucketOK(storage.WalkInfo(ctx, func(ctx context.Context, info snapshots.Info) error {
			if info.Kind == snapshots.KindCommitted && info.Labels[snapshots.LabelSnapshotRef] == target && info.Parent == parent {
				found = true
			}
			return nil
		}, filter))
	})
	return found, err
}

// commitKnown records a committed snapshot named target for a layer the
// store already holds, without any data being written.
func (s *Snapshotter) commitKnown(ctx context.Context, key, target, parent string, mkey digest.Digest, opts []snapshots.Opt) error {
	s.gcMu.RLock()
	defer s.gcMu.RUnlock()
	if !s.layers.Has(mkey) {
		return fmt.Errorf("layer %s vanished: %w", mkey, errdefs.ErrNotFound)
	}
	var snap storage.Snapshot
	err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		var err error
		snap, err = storage.CreateSnapshot(ctx, snapshots.KindActive, key, parent, opts...)
		if err != nil {
			return err
		}
		if err := s.makeDirs(snap.ID, modeRootfs, ""); err != nil {
			return err
		}
		if err := writeFileAtomic(s.paths(snap.ID).manifest(), []byte(mkey.String()+"\n")); err != nil {
			return err
		}
		// A layer found by diffID adds no bytes to the store.
		if _, err := storage.CommitActive(ctx, key, target, snapshots.Usage{}, opts...); err != nil {
			os.RemoveAll(s.paths(snap.ID).dir())
			return err
		}
		return nil
	})
	if err == nil {
		s.warmTreeLater(ctx, snap.ID, snap.ParentIDs)
	}
	return err
}

// LayerFetcher brings a layer from elsewhere into the node's stores, its
// manifest under the layer's real diffID (the label
// containerd.io/snapshot/diff-id), all verified. An error means: unpack
// normally (the fetcher logs and counts it).
type LayerFetcher interface {
	FetchLayer(ctx context.Context, labels map[string]string, layers *layout.Store) error
}

// fetchLayer asks the Fetcher for an unpack's layer; on success the layer
// is on the node and Prepare proceeds as for a known layer (commit under
// the target name, or staged in a parallel unpack). gcMu keeps Cleanup
// from deleting the fresh manifest before a snapshot refers to it.
func (s *Snapshotter) fetchLayer(ctx context.Context, labels map[string]string) bool {
	s.gcMu.RLock()
	defer s.gcMu.RUnlock()
	return s.cfg.Fetcher.FetchLayer(ctx, labels, s.layers) == nil
}
