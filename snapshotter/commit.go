package snapshotter

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/dupsnap/dupsnap/internal/phases"
	"github.com/dupsnap/dupsnap/pkg/cas"
	"github.com/dupsnap/dupsnap/pkg/layout"
	"github.com/dupsnap/dupsnap/pkg/rootfs"
)

// Commit turns an active snapshot into a layer manifest: an unpack's
// staging dir is ingested with layout.FromDir, an active rootfs's changes
// with rootfs.Changes, a staged snapshot just records its known layer. A
// parent given only here (rebase) is taken by the metastore: manifests do
// not depend on their parent.
func (s *Snapshotter) Commit(ctx context.Context, name, key string, opts ...snapshots.Opt) (retErr error) {
	defer observe("commit", time.Now())
	ph := phases.Start(time.Now())
	ctx = logKey(ctx, key)
	var (
		snap storage.Snapshot
		info snapshots.Info
	)
	if err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		var err error
		if _, info, _, err = storage.GetInfo(ctx, key); err != nil {
			return err
		}
		snap, err = storage.GetSnapshot(ctx, key)
		return err
	}); err != nil {
		return err
	}
	if info.Kind != snapshots.KindActive {
		return fmt.Errorf("snapshot %q is not active: %w", key, errdefs.ErrFailedPrecondition)
	}
	var base snapshots.Info
	for _, o := range opts {
		if err := o(&base); err != nil {
			return err
		}
	}

	ph.Mark("info")
	s.gcMu.RLock()
	defer s.gcMu.RUnlock()
	ph.Mark("gc-lock")

	p := s.paths(snap.ID)
	mode := s.modeOf(snap.ID)
	var (
		mkey  digest.Digest
		usage snapshots.Usage
		err   error
	)
	switch mode {
	case modeStaged:
		if mkey, err = readDigestFile(p.staged()); err != nil {
			return err
		}
		if !s.layers.Has(mkey) {
			return fmt.Errorf("staged layer %s vanished: %w", mkey, errdefs.ErrNotFound)
		}
	case modeUnpack:
		mkey, usage, err = s.ingestStaging(ctx, snap, base.Parent, p, ph)
	default:
		rcfg, cerr := s.rootfsConfig(snap.ID, snap.ParentIDs, false)
		if cerr != nil {
			return cerr
		}
		mkey, usage, err = s.ingest(ctx, ph, func(b *cas.Batch) (*layout.Manifest, error) {
			return rootfs.Changes(ctx, rcfg, b)
		})
	}
	if err != nil {
		return fmt.Errorf("commit %q: %w", key, err)
	}
	if err := writeFileAtomic(p.manifest(), []byte(mkey.String()+"\n")); err != nil {
		return err
	}
	if mode == modeUnpack {
		// Remember the real diffID so the next pull of this layer hits.
		real := digest.Digest(base.Labels[snapshots.LabelSnapshotDiffID])
		if real == "" {
			real = digest.Digest(info.Labels[snapshots.LabelSnapshotDiffID])
		}
		if real.Validate() == nil {
			if err := s.recordDiffID(real, mkey); err != nil {
				log.G(ctx).WithError(err).Warn("recording diffID")
			}
		}
	}

	ph.Mark("manifest-ref")
	if err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		_, err := storage.CommitActive(ctx, key, name, usage, opts...)
		return err
	}); err != nil {
		os.Remove(p.manifest())
		return err
	}
	ph.Mark("metastore")
	// The first container of this layer's chain should find its merged
	// tree cached (the last layer of a pull wins: parents are cancelled).
	s.warmTreeLater(ctx, snap.ID, snap.ParentIDs)

	// The snapshot is a manifest now; its working state is garbage.
	for _, mp := range []string{p.mnt(), p.lower()} {
		if err := s.stopRootfs(ctx, mp); err != nil {
			log.G(ctx).WithError(err).Warn("stopping rootfs after commit")
		}
	}
	if mode == modeUnpack {
		// Thousands of staging names to unlink: not on the pull's path.
		s.trash(ctx, p.upper())
	}
	for _, d := range []string{p.upper(), p.work(), p.lowerDir(), p.mnt(), p.state(), p.staged(), p.ingesting()} {
		if err := removeDir(d); err != nil {
			log.G(ctx).WithError(err).WithField("path", d).Warn("cleaning committed snapshot")
		}
	}
	ph.Mark("cleanup")
	log.G(ctx).WithField("name", name).WithField("layer", mkey).WithField("added", usage.Size).
		WithField("phases", ph.String()).Debug("committed")
	return nil
}

// ingest builds a manifest through fn under a CAS lease, makes its objects
// durable and stores the manifest. Usage is what the layer added to the
// store: objects the CAS did not have before this batch, and its entries.
func (s *Snapshotter) ingest(ctx context.Context, ph *phases.Timer, fn func(*cas.Batch) (*layout.Manifest, error)) (digest.Digest, snapshots.Usage, error) {
	release, err := s.cas.Lease(ctx)
	if err != nil {
		return "", snapshots.Usage{}, err
	}
	defer release()
	b := s.cas.NewBatch()
	ph.Mark("lease")
	m, err := fn(b)
	if err != nil {
		b.Abort()
		return "", snapshots.Usage{}, err
	}
	ph.Mark("read")
	sizes := make(map[digest.Digest]int64, len(m.Entries))
	for _, e := range m.Entries {
		if e.Digest != "" {
			sizes[e.Digest] = e.Size
		}
	}
	// Objects of a batch become visible only at Commit, so Has tells which
	// ones were already on the node.
	var added int64
	for _, d := range m.Objects() {
		if !s.cas.Has(d) {
			added += sizes[d]
		}
	}
	if err := b.Commit(ctx); err != nil {
		return "", snapshots.Usage{}, err
	}
	ph.Mark("batch-commit")
	if !s.layers.Has(m.DiffID) {
		if err := s.layers.Put(ctx, m); err != nil {
			return "", snapshots.Usage{}, err
		}
	}
	ph.Mark("manifest-put")
	ingestedBytes.Add(float64(added))
	return m.DiffID, snapshots.Usage{Size: added, Inodes: int64(len(m.Entries))}, nil
}
