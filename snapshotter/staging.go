package snapshotter

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/dupsnap/dupsnap/internal/phases"
	"github.com/dupsnap/dupsnap/pkg/cas"
	"github.com/dupsnap/dupsnap/pkg/layout"
)

// ingestStaging commits an unpack's staging dir. The dir is on the CAS's
// filesystem and is deleted after the commit, so its files are adopted as
// objects (hashed in place and linked, never copied): the applier's
// writes are the only write of the data, and the batch's syncfs makes them
// durable before any object name exists. Adoption rewrites the files'
// metadata (after FromDir has read it), so a staging dir can be ingested
// once only: a second attempt (containerd retrying a failed Commit) fails.
func (s *Snapshotter) ingestStaging(ctx context.Context, snap storage.Snapshot, parent string, p snapPaths, ph *phases.Timer) (key digest.Digest, u snapshots.Usage, err error) {
	since := time.Now()
	if st, err := os.Stat(p.work()); err == nil {
		since = st.ModTime() // made at Prepare, before the applier ran
	}
	skip, err := s.implicitDirs(ctx, snap, parent, since)
	if err != nil {
		return "", u, err
	}
	f, err := os.OpenFile(p.ingesting(), os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		if os.IsExist(err) {
			return "", u, fmt.Errorf("staging dir was already ingested by a failed commit: %w", errdefs.ErrFailedPrecondition)
		}
		return "", u, err
	}
	f.Close()
	if !s.cfg.NoSync {
		// The applier's data must reach the disk before Commit returns:
		// start that now, so the device writes while FromDir hashes and
		// the batch's own syncfs finds little left to do.
		if fd, err := unix.Open(p.upper(), unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0); err == nil {
			done := make(chan struct{})
			go func() {
				defer close(done)
				unix.Syncfs(fd)
				unix.Close(fd)
			}()
			defer func() { <-done }()
		}
	}
	return s.ingest(ctx, ph, func(b *cas.Batch) (*layout.Manifest, error) {
		return layout.FromDirWith(ctx, b, p.upper(), layout.DirOptions{Adopt: true, SkipDir: skip})
	})
}
