package cas

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// sharedLock is the store-wide flock on <root>/lock. flock(2) locks belong
// to an open file description, so all shared holders of this process share
// one descriptor (reference counted: the first takes LOCK_SH, the last
// drops it), while every exclusive locker opens its own descriptor so that
// it also conflicts with this process's own shared holders.
type sharedLock struct {
	path string
	mu   sync.Mutex
	f    *os.File
	n    int
}

func (l *sharedLock) init(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return fmt.Errorf("cas: open lock: %w", err)
	}
	l.path, l.f = path, f
	return nil
}

func (l *sharedLock) close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.f == nil {
		return nil
	}
	err := l.f.Close()
	l.f, l.n = nil, 0
	return err
}

// shared takes (a reference on) the shared lock, waiting while an
// exclusive holder (Collect, temp sweep) has it.
func (l *sharedLock) shared(ctx context.Context) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.f == nil {
		return errors.New("cas: store closed")
	}
	if l.n == 0 {
		if err := pollFlock(ctx, int(l.f.Fd()), unix.LOCK_SH); err != nil {
			return err
		}
	}
	l.n++
	return nil
}

func (l *sharedLock) unshare() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.n == 0 {
		return
	}
	l.n--
	if l.n == 0 && l.f != nil {
		unix.Flock(int(l.f.Fd()), unix.LOCK_UN)
	}
}

// exclusive waits (until ctx is done) for the exclusive lock.
func (l *sharedLock) exclusive(ctx context.Context) (func(), error) {
	f, err := os.OpenFile(l.path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("cas: open lock: %w", err)
	}
	if err := pollFlock(ctx, int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		return nil, err
	}
	return func() { f.Close() }, nil
}

func (l *sharedLock) tryExclusive() (func(), bool, error) {
	f, err := os.OpenFile(l.path, os.O_RDWR, 0)
	if err != nil {
		return nil, false, fmt.Errorf("cas: open lock: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, false, nil
		}
		return nil, false, fmt.Errorf("cas: flock: %w", err)
	}
	return func() { f.Close() }, true, nil
}

// pollFlock retries a non-blocking flock with backoff: a blocking flock(2)
// cannot be cancelled by a context.
func pollFlock(ctx context.Context, fd, how int) error {
	wait := 500 * time.Microsecond
	for {
		err := unix.Flock(fd, how|unix.LOCK_NB)
		if err == nil {
			return nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			return fmt.Errorf("cas: flock: %w", err)
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("cas: waiting for store lock: %w", ctx.Err())
		case <-t.C:
		}
		if wait < 50*time.Millisecond {
			wait *= 2
		}
	}
}

// Lease takes the shared lock that Collect (and the temp sweep) wait for.
// Hold it from the first put of a layer until the manifest that references
// its objects is durable: while any lease is held, no Collect runs, so an
// object a put just found already present (and so did not rewrite, keeping
// its old mtime) cannot be collected before the caller's root references it.
// Do not call Collect from a goroutine of a process that holds a lease: it
// would wait for that lease (until ctx is done).
func (s *Store) Lease(ctx context.Context) (release func(), err error) {
	if err := s.lk.shared(ctx); err != nil {
		return nil, err
	}
	var once sync.Once
	return func() { once.Do(s.lk.unshare) }, nil
}
