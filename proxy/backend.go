package proxy

import (
	"context"
	"fmt"
	"path/filepath"
	"time"

	"github.com/dupsnap/dupsnap/proxy/s3store"
)

// openBackend opens the durable stores cfg.Storage selects.
func openBackend(ctx context.Context, cfg Config) (Backend, error) {
	var be Backend
	switch cfg.Storage.Type {
	case "s3":
		b, err := s3store.Open(cfg.Storage.S3)
		if err != nil {
			return be, err
		}
		files, err := newS3FileStore(ctx, b, filepath.Join(cfg.Root, "scratch"), cfg)
		if err != nil {
			return be, err
		}
		return Backend{Blobs: &s3BlobStore{b: b, refresh: time.Duration(cfg.GCGrace) / 2}, Meta: &s3MetaStore{b: b}, Files: files}, nil
	default:
		var err error
		if be.Blobs, err = newFSBlobStore(filepath.Join(cfg.Root, "blobs"), cfg.NoSync); err != nil {
			return be, err
		}
		if be.Meta, err = newFSMetaStore(filepath.Join(cfg.Root, "meta"), cfg.NoSync); err != nil {
			return be, err
		}
		if be.Files, err = newFSFileStore(cfg.Root, cfg.NoSync); err != nil {
			return be, fmt.Errorf("opening file store: %w", err)
		}
		return be, nil
	}
}
