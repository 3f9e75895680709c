package snapshotter

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/dupsnap/dupsnap/internal/phases"
	"github.com/dupsnap/dupsnap/pkg/rootfs"
)

// Remove deletes a snapshot's metadata, unmounts its rootfs and kills the
// server; waiting for the server's exit and deleting the snapshot's dir go
// on in the background (see removeLater). Its layer manifest and objects
// stay until Cleanup, since other snapshots may share them.
//
// containerd's garbage collector calls Remove holding the lock that its
// Prepare of the next container waits for: every millisecond here was one
// of that container's start.
func (s *Snapshotter) Remove(ctx context.Context, key string) error {
	defer observe("remove", time.Now())
	ctx = logKey(ctx, key)
	ph := phases.Start(time.Now())
	var id string
	if err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		var err error
		id, _, err = storage.Remove(ctx, key)
		if err != nil {
			return fmt.Errorf("failed to remove snapshot %s: %w", key, err)
		}
		return nil
	}); err != nil {
		return err
	}
	ph.Mark("metastore")
	p := s.paths(id)
	var waits []func(context.Context)
	for _, mp := range []string{p.mnt(), p.lower()} {
		wait, err := s.stopRootfsBegin(ctx, mp)
		if err != nil {
			log.G(ctx).WithError(err).Warn("stopping rootfs")
		}
		waits = append(waits, wait)
	}
	ph.Mark("unmount")
	s.removeLater(ctx, p, waits)
	log.G(ctx).WithField("id", id).WithField("phases", ph.String()).Debug("snapshot removed")
	return nil
}

// removingSet holds the dirs of removed snapshots still being deleted in
// the background: Cleanup leaves them to that.
type removingSet struct {
	mu   sync.Mutex
	dirs map[string]bool
}

func (r *removingSet) set(dir string, on bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !on {
		delete(r.dirs, dir)
		return
	}
	if r.dirs == nil {
		r.dirs = map[string]bool{}
	}
	r.dirs[dir] = true
}

func (r *removingSet) has(dir string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.dirs[dir]
}

// removeLater finishes a Remove at background priority: waits for the
// snapshot's servers to exit, then deletes its dir. Crash-safe: the
// snapshot is gone from the metastore already, so what a crash leaves is
// an orphaned dir, which Cleanup stops and deletes like any other. Close
// waits for it (s.bg).
func (s *Snapshotter) removeLater(ctx context.Context, p snapPaths, waits []func(context.Context)) {
	ctx = context.WithoutCancel(ctx)
	s.removing.set(p.dir(), true)
	s.bg.Add(1)
	rootfs.InBackground(func() {
		defer s.bg.Done()
		defer s.removing.set(p.dir(), false)
		t0 := time.Now()
		for _, w := range waits {
			w(ctx)
		}
		// A dir that cannot go now (busy mount) is an orphan for Cleanup.
		if err := removeDir(p.dir()); err != nil {
			log.G(ctx).WithError(err).Warn("removing snapshot dir; left for cleanup")
		}
		log.G(ctx).WithField("took", time.Since(t0).Round(10*time.Microsecond)).Debug("snapshot dir removed")
	})
}

// Cleanup frees what no snapshot references: orphaned snapshot dirs,
// manifests of removed layers, stale diffID index entries, then CAS objects
// older than the grace period that no remaining manifest references.
func (s *Snapshotter) Cleanup(ctx context.Context) error {
	defer observe("cleanup", time.Now())
	s.gcMu.Lock()
	defer s.gcMu.Unlock()

	ids := map[string]string{}
	if err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		var err error
		ids, err = storage.IDMap(ctx)
		return noBucketOK(err)
	}); err != nil {
		return err
	}

	snapDir := filepath.Join(s.root, "snapshots")
	des, err := os.ReadDir(snapDir)
	if err != nil {
		return err
	}
	keep := map[digest.Digest]bool{}
	removedDirs := 0
	for _, de := range des {
		id := de.Name()
		p := s.paths(id)
		if _, ok := ids[id]; !ok {
			if s.removing.has(p.dir()) {
				continue // Remove's background half deletes it
			}
			for _, mp := range []string{p.mnt(), p.lower()} {
				_ = s.stopRootfs(ctx, mp)
			}
			if err := removeDir(p.dir()); err != nil {
				log.G(ctx).WithError(err).WithField("id", id).Warn("removing orphaned snapshot dir")
			} else {
				removedDirs++
			}
			continue
		}
		for _, f := range []string{p.manifest(), p.staged()} {
			if k, err := readDigestFile(f); err == nil {
				keep[k] = true
			}
		}
	}

	list, err := s.layers.List(ctx)
	if err != nil {
		return err
	}
	removedLayers := 0
	for _, k := range list {
		if keep[k] {
			continue
		}
		if s.youngLayer(k) {
			// Imported by hand (dupsnap store import) or by a pull whose
			// snapshot is not recorded yet: not garbage within the grace.
			keep[k] = true
			continue
		}
		if err := s.layers.Delete(ctx, k); err != nil {
			log.G(ctx).WithError(err).WithField("layer", k).Warn("deleting unreferenced layer")
			continue
		}
		removedLayers++
	}
	if des, err := os.ReadDir(filepath.Join(s.root, "diffids")); err == nil {
		for _, de := range des {
			f := filepath.Join(s.root, "diffids", de.Name())
			if k, err := readDigestFile(f); err != nil || !keep[k] {
				if !strings.HasPrefix(de.Name(), ".tmp-") || err != nil {
					os.Remove(f)
				}
			}
		}
	}
	// containerd calls Cleanup after nearly every container removal, and a
	// collection reads every manifest and lists every object (31-41 ms
	// measured, beside the next container's start). Objects lose their
	// last reference only when a layer goes, so with nothing removed just
	// now only what was too young at the last collection can be garbage:
	// collect again once a grace period has passed since then.
	if removedDirs == 0 && removedLayers == 0 && !s.lastCollect.IsZero() && time.Since(s.lastCollect) < s.cfg.GCGrace {
		log.G(ctx).Debug("cleanup: nothing removed, collection not due")
		return nil
	}
	s.lastCollect = time.Now()
	n, freed, err := s.layers.Collect(ctx, s.cfg.GCGrace)
	if err != nil {
		return fmt.Errorf("collecting objects: %w", err)
	}
	log.G(ctx).WithField("dirs", removedDirs).WithField("layers", removedLayers).
		WithField("objects", n).WithField("bytes", freed).Info("cleanup done")
	return nil
}

// youngLayer reports whether the manifest of layer k was written less than
// the GC grace ago. It stats layout.Store's file (<dir>/sha256/<hex>); an
// unknown age counts as young, so nothing is deleted on a doubt.
func (s *Snapshotter) youngLayer(k digest.Digest) bool {
	if k.Validate() != nil {
		return false
	}
	st, err := os.Stat(filepath.Join(s.layers.Dir(), k.Algorithm().String(), k.Encoded()))
	if err != nil {
		return !os.IsNotExist(err)
	}
	return time.Since(st.ModTime()) < s.cfg.GCGrace
}
