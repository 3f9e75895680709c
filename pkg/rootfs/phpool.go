package rootfs

import (
	"sync"

	"golang.org/x/sys/unix"
)

// Placeholder pool: the upper inode of a new region file is made ahead of
// its Create by a background goroutine, as an unnamed O_TMPFILE inode of
// the upper fs already marked with a fresh region id; Create links one
// into place (linkat AT_EMPTY_PATH: no lock on any dir but the target's,
// so a create never waits for the filler). Allocating an
// inode is the costliest part of a create on the host fs (on ext4 without
// a journal, the allocator skips every recently freed inode of the group
// one by one: 0.4-0.7 ms per create was measured here after deletes), and
// this takes it off the container's path onto the other core.
//
// Crash safety: a pooled placeholder has no name; the host fs frees it
// when its descriptor closes or after a crash. Once linked into upper it
// is an ordinary new region file (its region file is created at the first
// acquire, as for any placeholder whose create was not synced).

const (
	phPoolLow  = 32 // refill below this many
	phPoolHigh = 64 // refill up to this many
	phPoolPerm = 0o644
)

type phEntry struct {
	fd   int
	ref  cowRef
	perm uint32 // permission bits it got (the umask applied)
	uid  int    // owner it got
	gid  int    // group it got (the upper root's if that is setgid)
}

type phPool struct {
	mu      sync.Mutex
	ready   []phEntry
	filling bool
	broken  bool // the work dir refused a create, or the server stops
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
	if len(p.ready) < phPoolLow && !p.filling && !p.broken && r.upper != "" {
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
		p.mu.Unlock()
		e, err := r.newPlaceholder()
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

func (r *rootFS) newPlaceholder() (phEntry, error) {
	// In the upper root: the host fs places the inode near the upper tree.
	fd, err := unix.Open(r.upper, unix.O_TMPFILE|unix.O_RDWR|unix.O_CLOEXEC, phPoolPerm)
	if err != nil {
		return phEntry{}, err
	}
	ref := cowRef{id: newCowID()}
	if err := unix.Fsetxattr(fd, cowXattr, []byte(ref.String()), 0); err != nil {
		unix.Close(fd)
		return phEntry{}, err
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return phEntry{}, err
	}
	return phEntry{fd: fd, ref: ref, perm: st.Mode & 07777, uid: int(st.Uid), gid: int(st.Gid)}, nil
}

// putBackPlaceholder returns an unused entry (its link failed cleanly).
func (r *rootFS) putBackPlaceholder(e phEntry) {
	r.ph.mu.Lock()
	r.ph.ready = append(r.ph.ready, e)
	r.ph.mu.Unlock()
}

// dropPlaceholder discards an entry that cannot be used.
func dropPlaceholder(e phEntry) {
	unix.Close(e.fd) // the host fs frees the unnamed inode
}

// stopPlaceholders makes no more placeholders ahead.
func (r *rootFS) stopPlaceholders() {
	r.ph.mu.Lock()
	r.ph.broken = true
	r.ph.mu.Unlock()
}

// closePlaceholders stops the pool and frees its unused placeholders
// (the server is stopping; the state dir may be deleted next).
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
