package snapshotter

import (
	"context"
	"fmt"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/dupsnap/dupsnap/pkg/layout"
)

// Implicit parent directories.
//
// A layer tar need not contain the parent directories of its entries.
// containerd's applier (pkg/archive mkparent) then creates them in the
// staging dir: 0755 root:root, and copies the attributes of the same
// directory of the parent chain only if it is given lowerdirs - which it
// is not in a parallel unpack (no parent at Prepare), nor with an empty
// lowerdir. Recorded as is, such a directory would override the lower
// layer's (e.g. /tmp 1777 would become 0755 in the merged tree), although
// the tar said nothing about it. (containerd's overlayfs snapshotter has
// the same flaw in parallel mode.)
//
// At Commit the parent is known, so dupsnap drops the entry of every
// directory that (1) the applier can have created implicitly: mode 0755,
// owner 0:0, no xattrs (so not opaque), and mtime not older than the
// staging dir (explicit directories get their tar mtime restored at the
// end of the apply; tars are built before they are pulled), and (2) the
// parent chain has as a directory. The merged tree then shows the lower
// directory, as a sequential unpack with the parent as lowerdir does, and
// the synthesised tar omits the directory, as the original tar did. A
// directory the parent chain lacks keeps its 0755 entry (mkparent's
// default). An explicit tar directory matching (1) and (2) would have to
// carry a future mtime; dropping it loses only that mtime.

// implicitDirs returns the SkipDir function for an unpack's staging dir,
// or nil when there is no parent. The parent tree is merged only when a
// first candidate appears (layers usually carry their directories).
func (s *Snapshotter) implicitDirs(ctx context.Context, snap storage.Snapshot, parent string, since time.Time) (func(string, *unix.Stat_t, map[string]string) bool, error) {
	chain := snap.ParentIDs
	if len(chain) == 0 && parent != "" {
		var err error
		if chain, err = s.chainOf(ctx, parent); err != nil {
			return nil, fmt.Errorf("parent %q: %w", parent, err)
		}
	}
	if len(chain) == 0 {
		return nil, nil
	}
	var (
		tree    *layout.Tree
		treeErr error
	)
	return func(rel string, st *unix.Stat_t, xattrs map[string]string) bool {
		if st.Mode&07777 != 0o755 || st.Uid != 0 || st.Gid != 0 || len(xattrs) > 0 ||
			time.Unix(st.Mtim.Sec, st.Mtim.Nsec).Before(since) {
			return false
		}
		if tree == nil && treeErr == nil {
			tree, treeErr = s.mergeChain(ctx, chain)
			if treeErr != nil {
				// Keep the entry: a wrong mode is better than a lost directory.
				log.G(ctx).WithError(treeErr).Warn("merging parent chain for implicit directories")
			}
		}
		if tree == nil {
			return false
		}
		n := tree.Lookup(rel)
		if n == nil || n.Entry.Type != layout.TypeDir {
			return false
		}
		log.G(ctx).WithField("path", rel).Trace("implicit parent directory: keeping the parent's")
		return true
	}, nil
}

func (s *Snapshotter) mergeChain(ctx context.Context, chain []string) (*layout.Tree, error) {
	keys, err := s.layersOf(chain)
	if err != nil {
		return nil, err
	}
	ms := make([]*layout.Manifest, 0, len(keys))
	for _, k := range keys {
		m, err := s.layers.Get(ctx, k)
		if err != nil {
			return nil, err
		}
		ms = append(ms, m)
	}
	return layout.Merge(ms)
}

// chainOf lists the ids of committed snapshot name and its ancestors,
// nearest first (as storage.Snapshot.ParentIDs, which GetSnapshot gives
// for active snapshots only).
func (s *Snapshotter) chainOf(ctx context.Context, name string) (ids []string, err error) {
	err = s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		for name != "" {
			id, info, _, err := storage.GetInfo(ctx, name)
			if err != nil {
				return err
			}
			ids = append(ids, id)
			name = info.Parent
		}
		return nil
	})
	return ids, err
}
