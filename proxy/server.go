// Package proxy is dupproxy: a deduplicating OCI pull-through registry
// proxy. Layer blobs fetched from an upstream are decomposed into a file CAS
// (pkg/cas, compressed at rest) with a pkg/layout manifest and restored
// byte-identically on demand; manifests and configs are kept as fetched. It
// serves the OCI distribution pull API and the dedup API used by dupsnap.
package proxy

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sync/singleflight"
)

// errDigestMismatch: content did not hash to the digest it was named by.
var errDigestMismatch = errors.New("digest mismatch")

// Server is a dupproxy instance over one root directory (and, with an S3
// backend, one bucket that other replicas share).
type Server struct {
	cfg   Config
	ups   map[string]*upstream
	def   *upstream
	blobs BlobStore
	meta  MetaStore
	files FileStore
	cache *blobCache
	m     *metrics
	sf    singleflight.Group

	ctx      context.Context
	cancel   context.CancelFunc
	wg       sync.WaitGroup
	recipeQ  chan digest.Digest
	predictQ chan predictJob
	pending  sync.WaitGroup // queued background jobs (Flush waits)
	lock     *os.File
}

// Open opens the store under cfg.Root (creating it) and prepares serving.
// Only one process may have a root open at a time.
func Open(ctx context.Context, cfg Config) (*Server, error) {
	if err := cfg.Normalize(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.Root, 0o755); err != nil {
		return nil, fmt.Errorf("creating root: %w", err)
	}
	lock, err := os.OpenFile(filepath.Join(cfg.Root, "lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		lock.Close()
		return nil, fmt.Errorf("root %s is in use by another dupproxy process: %w", cfg.Root, err)
	}
	s := &Server{cfg: cfg, ups: map[string]*upstream{}, m: newMetrics(), lock: lock,
		recipeQ: make(chan digest.Digest, 1024), predictQ: make(chan predictJob, 256)}
	fail := func(err error) (*Server, error) {
		s.closeStores()
		return nil, err
	}
	if cfg.Upstream != "" {
		if s.def, err = newUpstream("default", UpstreamConfig{URL: cfg.Upstream, Username: cfg.Username, Password: cfg.Password, AuthPassthrough: cfg.AuthPassthrough}); err != nil {
			return fail(err)
		}
	}
	for k, uc := range cfg.Upstreams {
		if s.ups[k], err = newUpstream(k, uc); err != nil {
			return fail(err)
		}
	}
	be, err := openBackend(ctx, cfg)
	if err != nil {
		return fail(err)
	}
	s.blobs, s.meta, s.files = be.Blobs, be.Meta, be.Files
	if s.cache, err = newBlobCache(cfg.CacheDir, int64(cfg.CacheSize)); err != nil {
		return fail(err)
	}
	s.ctx, s.cancel = context.WithCancel(log.WithLogger(context.Background(), log.G(ctx)))
	s.wg.Add(2)
	go s.recipeWorker()
	go s.predictWorker()
	if !cfg.Offline {
		s.requeueRecipes(ctx)
	}
	return s, nil
}

// StartGC runs GC every cfg.GCInterval until Close.
func (s *Server) StartGC() {
	if s.cfg.GCInterval <= 0 {
		return
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		t := time.NewTicker(time.Duration(s.cfg.GCInterval))
		defer t.Stop()
		for {
			select {
			case <-s.ctx.Done():
				return
			case <-t.C:
				if rep, err := s.GC(s.ctx); err != nil {
					log.G(s.ctx).WithError(err).Error("periodic gc failed")
				} else {
					log.G(s.ctx).WithField("report", rep).Info("periodic gc done")
				}
			}
		}
	}()
}

// Flush waits until queued background work (recipe detection, predicted
// restores) is done.
func (s *Server) Flush(ctx context.Context) error {
	done := make(chan struct{})
	go func() { s.pending.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Metrics serves the Prometheus metrics.
func (s *Server) Metrics() http.Handler { return s.m.Handler() }

// Close stops background work and releases the root.
func (s *Server) Close() error {
	if s.cancel != nil {
		s.cancel()
	}
	s.wg.Wait()
	return s.closeStores()
}

func (s *Server) closeStores() error {
	var err error
	if s.files != nil {
		err = s.files.Close()
	}
	if s.lock != nil {
		s.lock.Close()
	}
	return err
}

func (s *Server) upstreamFor(ns string) (*upstream, error) {
	if u, ok := s.ups[ns]; ok {
		return u, nil
	}
	if s.def != nil {
		return s.def, nil
	}
	return nil, newErr(http.StatusNotFound, codeNameUnknown, fmt.Sprintf("no upstream configured for registry %q", ns), nil)
}
