package rootfs

import (
	"path/filepath"
	"strconv"
	"sync"

	"golang.org/x/sys/unix"
)

// Placeholder pool: the upper inode of a new region file is made ahead of
// its Create, in the work dir, by a background goroutine, already marked
// with a fresh region id; Create renames one into place. Allocating an
// inode is the costliest part of a create on the host fs (on ext4 without
// a journal, the allocator skips every recently freed inode of the group
// one by one: 0.4-0.7 ms per create was measured here after deletes), and
// this takes it off the container's path onto the other core.
//
// Crash safety: a pooled placeholder lives only in the work dir, which
// prepareState empties at every start; once renamed into upper it is an
// ordinary new region file (its region file is created at the first
// acquire, as for any placeholder whose create was not synced).

const (
	phPoolLow  = 32  // refill below this many
	phPoolHigh = 128 // refill up to this many
	phPoolPerm = 0o644
)

type phEntry struct {
	fd   int
	path string
	ref  cowRef
	perm uint32 // permission bits it got (the umask applied)
}

type phPool struct {
	mu      sync.Mutex
	ready   []phEntry
	filling bool
	broken  bool // the work dir refused a create, or the server stops
	seq     uint64
	filler  sync.WaitGroup
}

// takePlaceholder returns a pooled placeholder, and starts a refill when
// the pool runs low. ok is false when the pool is empty.
func (r *rootFS) takePlaceholder() (e phEntry, ok bool) {
	p := &r.ph
	p.mu.Lock()
	defer p.mu.Unlock()
	if n := len(p.ready); n > 0 {
		e, ok = p.ready[n-1], true
		p.ready = p.ready[:n-1]
	}
	if len(p.ready) < phPoolLow && !p.filling && !p.broken && r.work != "" {
		p.filling = true
		p.filler.Add(1)
		go r.fillPlaceholders()
	}
	return e, ok
}

// fillPlaceholders tops the pool up to phPoolHigh.
func (r *rootFS) fillPlaceholders() {
	p := &r.ph
	defer p.filler.Done()
	for {
		p.mu.Lock()
		if len(p.ready) >= phPoolHigh || p.broken {
			p.filling = false
			p.mu.Unlock()
			return
		}
		p.seq++
		path := filepath.Join(r.work, "ph"+strconv.FormatUint(p.seq, 10))
		p.mu.Unlock()
		e, err := r.newPlaceholder(path)
		p.mu.Lock()
		if err != nil {
			p.broken, p.filling = true, false
			p.mu.Unlock()
			return
		}
		p.ready = append(p.ready, e)
		p.mu.Unlock()
	}
}

func (r *rootFS) newPlaceholder(path string) (phEntry, error) {
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CREAT|unix.O_EXCL|unix.O_CLOEXEC, phPoolPerm)
	if err != nil {
		return phEntry{}, err
	}
	ref := cowRef{id: newCowID()}
	if err := unix.Fsetxattr(fd, cowXattr, []byte(ref.String()), 0); err != nil {
		unix.Close(fd)
		unix.Unlink(path)
		return phEntry{}, err
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		unix.Unlink(path)
		return phEntry{}, err
	}
	return phEntry{fd: fd, path: path, ref: ref, perm: st.Mode & 07777}, nil
}

// putBackPlaceholder returns an unused entry (its rename failed cleanly).
func (r *rootFS) putBackPlaceholder(e phEntry) {
	r.ph.mu.Lock()
	r.ph.ready = append(r.ph.ready, e)
	r.ph.mu.Unlock()
}

// dropPlaceholder discards an entry that cannot be used.
func dropPlaceholder(e phEntry) {
	unix.Close(e.fd)
	unix.Unlink(e.path)
}

// stopPlaceholders makes no more placeholders ahead.
func (r *rootFS) stopPlaceholders() {
	r.ph.mu.Lock()
	r.ph.broken = true
	r.ph.mu.Unlock()
}

// closePlaceholders stops the pool and removes its unused placeholders
// (the server is stopping; the work dir may be deleted next).
func (r *rootFS) closePlaceholders() {
	p := &r.ph
	p.mu.Lock()
	p.broken = true
	p.mu.Unlock()
	p.filler.Wait()
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, e := range p.ready {
		dropPlaceholder(e)
	}
	p.ready = nil
}
