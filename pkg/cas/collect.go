package cas

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

// Collect deletes every object that keep rejects and whose mtime is older
// than grace, under the exclusive lock (it waits, until ctx is done, for
// every lease and batch in any process to finish).
//
// Crash safety: deleting is just unlink(2) of unreferenced objects, so a
// crash mid-way only leaves some garbage for the next run. Referenced
// objects are safe as long as the caller's keep reflects roots that are
// durable at the time Collect holds the lock: build the root set lazily on
// the first keep call (which happens under the lock), not before calling
// Collect. An object a put is still writing is protected by the put's own
// hold of the shared lock; one a finished put returned, until its manifest
// is durable, by the caller's Lease; grace covers callers that skip leases.
func (s *Store) Collect(ctx context.Context, keep func(digest.Digest) bool, grace time.Duration) (n int, bytes int64, err error) {
	release, err := s.lk.exclusive(ctx)
	if err != nil {
		return 0, 0, err
	}
	defer release()
	cutoff := time.Now().Add(-grace)
	err = s.Walk(ctx, func(in Info) error {
		if !in.ModTime.Before(cutoff) || keep(in.Digest) {
			return nil
		}
		if err := s.Delete(in.Digest); err != nil {
			if errors.Is(err, ErrNotFound) {
				return nil
			}
			return err
		}
		n++
		bytes += in.Stored
		return nil
	})
	if n > 0 {
		log.G(ctx).WithField("objects", n).WithField("bytes", bytes).Debug("cas: collected unreferenced objects")
	}
	return n, bytes, err
}

// Delete removes an object (in whichever format it is stored).
func (s *Store) Delete(d digest.Digest) error {
	h, err := hexOf(d)
	if err != nil {
		return err
	}
	found := false
	for _, name := range s.names(h) {
		err := unix.Unlinkat(s.objFd, name, 0)
		if err == nil {
			found = true
		} else if !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("cas: delete %s: %w", d, err)
		}
	}
	if !found {
		return fmt.Errorf("%w: %s", ErrNotFound, d)
	}
	return nil
}
