package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/dupsnap/dupsnap/pkg/cas"
	"github.com/dupsnap/dupsnap/pkg/layout"
)

// fsFileStore is the local FileStore: pkg/cas (compressed at rest) and a
// pkg/layout store under the root. One process per root (Open's flock), so
// an in-process RWMutex is enough to order ingests against the GC sweep.
type fsFileStore struct {
	cas     *cas.Store
	layouts *layout.Store
	gcMu    sync.RWMutex
}

func newFSFileStore(root string, noSync bool) (*fsFileStore, error) {
	c, err := cas.Open(filepath.Join(root, "cas"), cas.Options{Compress: true, NoSync: noSync})
	if err != nil {
		return nil, fmt.Errorf("opening CAS: %w", err)
	}
	l, err := layout.OpenStore(filepath.Join(root, "layouts"), c)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("opening layout store: %w", err)
	}
	return &fsFileStore{cas: c, layouts: l}, nil
}

func (s *fsFileStore) Import(ctx context.Context, r io.Reader) (*layout.Manifest, error) {
	return s.layouts.Import(ctx, r, layout.IngestOptions{})
}

func (s *fsFileStore) GetLayout(ctx context.Context, id digest.Digest) (*layout.Manifest, error) {
	return s.layouts.Get(ctx, id)
}

func (s *fsFileStore) DeleteLayout(ctx context.Context, id digest.Digest) error {
	err := s.layouts.Delete(ctx, id)
	if errors.Is(err, layout.ErrNotFound) {
		return nil
	}
	return err
}

func (s *fsFileStore) WalkLayouts(ctx context.Context, fn func(digest.Digest, int64, time.Time) error) error {
	ids, err := s.layouts.List(ctx)
	if err != nil {
		return err
	}
	for _, id := range ids {
		fi, err := os.Stat(filepath.Join(s.layouts.Dir(), "sha256", id.Encoded()))
		if err != nil {
			continue // deleted meanwhile
		}
		if err := fn(id, fi.Size(), fi.ModTime()); err != nil {
			return err
		}
	}
	return nil
}

func (s *fsFileStore) Open(d digest.Digest) (io.ReadCloser, error) { return s.cas.Open(d) }

func (s *fsFileStore) OpenStored(_ context.Context, d digest.Digest) (io.ReadCloser, int64, int64, bool, error) {
	info, err := s.cas.Stat(d)
	if err != nil {
		return nil, 0, 0, false, err
	}
	if !info.Compressed {
		rc, err := s.cas.Open(d)
		return rc, info.Size, info.Size, false, err
	}
	// The stored file is a valid zstd stream: send it without recompressing.
	f, err := os.Open(s.cas.Path(d))
	if err != nil {
		return nil, 0, 0, false, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, 0, 0, false, err
	}
	return f, info.Size, fi.Size(), true, nil
}

func (s *fsFileStore) WalkObjects(ctx context.Context, fn func(ObjectInfo) error) error {
	return s.cas.Walk(ctx, func(i cas.Info) error {
		return fn(ObjectInfo{Digest: i.Digest, Size: i.Size, Stored: i.Stored, ModTime: i.ModTime})
	})
}

func (s *fsFileStore) Collect(ctx context.Context, grace time.Duration) (int, int64, error) {
	return s.layouts.Collect(ctx, grace)
}

func (s *fsFileStore) Lease(context.Context) (func(), error) {
	s.gcMu.RLock()
	return s.gcMu.RUnlock, nil
}

func (s *fsFileStore) Exclusive(context.Context) (func(), error) {
	s.gcMu.Lock()
	return s.gcMu.Unlock, nil
}

func (s *fsFileStore) Close() error { return s.cas.Close() }
