package proxy

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"math/big"
	"strings"
	"time"

	"github.com/containerd/log"

	"github.com/dupsnap/dupsnap/proxy/s3store"
)

// bucketLocks is a readers-writer lock kept in the bucket, so ingests on
// any replica exclude the GC sweep of any other. Each holder writes its own
// object under locks/ and renews it every ttl/3; an object not renewed for
// ttl (a killed replica) no longer counts. Writer-preferring, Dekker style
// (needs read-after-write consistent listings, which S3 and SeaweedFS give):
//
//	ingest: put lease-X; if a live gc-* exists: delete lease-X, wait, retry.
//	gc:     put gc-Y; wait until no live lease-* is left, keeping gc-Y.
//
// Two sweeps may run at once: each reads complete roots (no ingest runs)
// and deletes are idempotent, so GCs need not exclude each other.
type bucketLocks struct {
	b   *s3store.Bucket
	ttl time.Duration
}

type lockState struct{ leases, gcs []string }

func (l *bucketLocks) state(ctx context.Context) (lockState, error) {
	var st lockState
	err := l.b.List(ctx, "locks/", func(i s3store.Info) error {
		if time.Since(i.ModTime) > l.ttl {
			return nil // holder died; ignored (and left for GC to remove)
		}
		name := strings.TrimPrefix(i.Key, "locks/")
		switch {
		case strings.HasPrefix(name, "lease-"):
			st.leases = append(st.leases, i.Key)
		case strings.HasPrefix(name, "gc-"):
			st.gcs = append(st.gcs, i.Key)
		}
		return nil
	})
	return st, err
}

func randID() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func jitter(d time.Duration) time.Duration {
	n, _ := rand.Int(rand.Reader, big.NewInt(int64(d)))
	return d/2 + time.Duration(n.Int64())/2
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

func (l *bucketLocks) put(ctx context.Context, key string) error {
	return l.b.Put(ctx, key, strings.NewReader(""), 0, nil, false)
}

// hold renews key until the returned release is called, then deletes it.
func (l *bucketLocks) hold(ctx context.Context, key string) func() {
	done := make(chan struct{})
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		t := time.NewTicker(l.ttl / 3)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				if err := l.put(context.WithoutCancel(ctx), key); err != nil {
					log.G(ctx).WithError(err).WithField("lock", key).Warn("renewing bucket lock failed")
				}
			}
		}
	}()
	return func() {
		close(done)
		<-stopped
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		if err := l.b.Delete(dctx, key); err != nil {
			log.G(ctx).WithError(err).WithField("lock", key).Warn("releasing bucket lock failed (expires by itself)")
		}
	}
}

// Lease is taken by an ingest.
func (l *bucketLocks) Lease(ctx context.Context) (func(), error) {
	key := "locks/lease-" + randID()
	for wait := 100 * time.Millisecond; ; wait = min(2*wait, 2*time.Second) {
		if err := l.put(ctx, key); err != nil {
			return nil, fmt.Errorf("taking ingest lease: %w", err)
		}
		st, err := l.state(ctx)
		if err != nil {
			_ = l.b.Delete(context.WithoutCancel(ctx), key)
			return nil, fmt.Errorf("taking ingest lease: %w", err)
		}
		if len(st.gcs) == 0 {
			return l.hold(ctx, key), nil
		}
		_ = l.b.Delete(context.WithoutCancel(ctx), key)
		if err := sleepCtx(ctx, jitter(wait)); err != nil {
			return nil, fmt.Errorf("waiting for a GC sweep in the bucket: %w", err)
		}
	}
}

// Exclusive is taken by a GC sweep; it gives up after a few ttl so a busy
// store delays collection rather than blocking it forever.
// (Writer-preferring: sweeps back to back would starve ingests; periodic GC
// runs every gc_interval.)
func (l *bucketLocks) Exclusive(ctx context.Context) (func(), error) {
	key := "locks/gc-" + randID()
	deadline := time.Now().Add(3 * l.ttl)
	if err := l.put(ctx, key); err != nil {
		return nil, fmt.Errorf("taking gc lock: %w", err)
	}
	release := l.hold(ctx, key)
	// Keep our gc object (new ingests wait) until running ingests finish.
	for wait := 50 * time.Millisecond; ; wait = min(2*wait, time.Second) {
		st, err := l.state(ctx)
		if err != nil {
			release()
			return nil, fmt.Errorf("taking gc lock: %w", err)
		}
		if len(st.leases) == 0 {
			return release, nil
		}
		if time.Now().After(deadline) {
			release()
			return nil, fmt.Errorf("bucket busy: %d ingest(s) still running after %s", len(st.leases), 3*l.ttl)
		}
		if err := sleepCtx(ctx, jitter(wait)); err != nil {
			release()
			return nil, err
		}
	}
}

// sweepStale removes lock objects of dead holders.
func (l *bucketLocks) sweepStale(ctx context.Context) {
	_ = l.b.List(ctx, "locks/", func(i s3store.Info) error {
		if time.Since(i.ModTime) > 2*l.ttl {
			_ = l.b.Delete(ctx, i.Key)
		}
		return nil
	})
}
