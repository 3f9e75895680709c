package rootfs

import (
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// On a writable mount the kernel forgets a FUSE inode's atime after every
// uncached READDIR of a directory (fuse_readdir_uncached) and every
// passthrough read of a file (fuse_file_accessed): fuse_invalidate_atime
// sets STATX_ATIME in the inode's inval_mask unless the whole superblock is
// read-only, and fuse_update_get_attr then turns the next lstat of that
// inode into a synchronous GETATTR (atime is never in fuse_get_cache_mask).
// So the second walk of a tree waited for one GETATTR round trip per
// directory (and per passthrough file read since), although nothing had
// changed; only the third walk was served by the kernel alone.
//
// The refresher takes that round trip off the reader's path: shortly after
// a directory was listed by the server (or a passthrough file was closed),
// it has the inode stat'ed through the mount, so the kernel asks for the
// attributes then, while the reader is busy elsewhere, and the reader's own
// later lstat finds them valid. If no GETATTR came (the kernel had not yet
// dropped the atime when the lstat ran), it tries again a little later.
//
// The lookups run in a child process, never in the server's own: see
// refreshproc.go for why (a server that is a client of its own mount
// cannot die cleanly).

const (
	refreshDelay = 10 * time.Millisecond // after the last READDIR of a node
	refreshTries = 3                     // the delay grows 5x per try
	refreshMax   = 1 << 16               // queued nodes at most (more are dropped)
)

// refreshOn: DUPSNAP_ROOTFS_NO_ATTR_REFRESH=1 turns the refresher off
// (A/B measurements). Its lookups run in a child process (refreshproc.go).
var refreshOn = os.Getenv("DUPSNAP_ROOTFS_NO_ATTR_REFRESH") == ""

type refreshItem struct {
	at    time.Time
	tries int
}

type attrRefresher struct {
	child   refreshChild // its mount "": off
	mu      sync.Mutex
	due     map[*node]refreshItem
	running bool
	wake    chan struct{}
}

func newAttrRefresher(mountpoint string, readOnly bool) *attrRefresher {
	a := &attrRefresher{due: map[*node]refreshItem{}, wake: make(chan struct{}, 1)}
	if !readOnly && refreshOn { // a read-only superblock keeps atimes valid
		a.child.mount = mountpoint
	}
	return a
}

// add schedules a refresh of n's attributes after refreshDelay (moved
// later if n is added again before).
func (a *attrRefresher) add(n *node) {
	if a == nil || a.child.mount == "" {
		return
	}
	a.mu.Lock()
	it, ok := a.due[n]
	if !ok && len(a.due) >= refreshMax {
		a.mu.Unlock()
		return
	}
	it.at = time.Now().Add(refreshDelay)
	a.due[n] = it
	start := !a.running
	a.running = true
	a.mu.Unlock()
	if start {
		go a.loop()
	} else {
		select {
		case a.wake <- struct{}{}:
		default:
		}
	}
}

// loop refreshes due nodes until none is queued.
func (a *attrRefresher) loop() {
	var ready []*node
	var tries []int
	for {
		a.mu.Lock()
		if len(a.due) == 0 {
			a.running = false
			a.mu.Unlock()
			return
		}
		now := time.Now()
		var next time.Time
		ready, tries = ready[:0], tries[:0]
		for n, it := range a.due {
			if !it.at.After(now) {
				ready = append(ready, n)
				tries = append(tries, it.tries)
				delete(a.due, n)
			} else if next.IsZero() || it.at.Before(next) {
				next = it.at
			}
		}
		a.mu.Unlock()
		for i, n := range ready {
			if !a.refresh(n) && tries[i]+1 < refreshTries {
				a.retry(n, tries[i]+1)
			}
		}
		if len(ready) == 0 {
			t := time.NewTimer(time.Until(next))
			select {
			case <-t.C:
			case <-a.wake:
			}
			t.Stop()
		}
	}
}

func (a *attrRefresher) retry(n *node, tries int) {
	d := refreshDelay
	for i := 0; i < tries; i++ {
		d *= 5
	}
	a.mu.Lock()
	if _, ok := a.due[n]; !ok { // else added again meanwhile: that wins
		a.due[n] = refreshItem{at: time.Now().Add(d), tries: tries}
	}
	a.mu.Unlock()
}

// refresh has the child stat n through the mount; it reports whether that
// brought the kernel to ask for n's attributes (or there is nothing to do).
func (a *attrRefresher) refresh(n *node) bool {
	p, ok := n.path()
	if !ok {
		return true // no name: nothing to refresh
	}
	n.refreshWant.Store(true)
	if err := a.child.stat(p); err != nil {
		n.refreshWant.Store(false)
		return true // gone, renamed or unmounted: give up
	}
	return !n.refreshWant.Swap(false)
}

// statBeneath fstat's path p of the mount: resolved beneath its root
// without following any symlink, so that a container that swapped a
// directory for a symlink (to "/", say) cannot steer the server's lookup
// onto host paths. The O_PATH descriptors live for a few microseconds.
func statBeneath(mount, p string) error {
	root, err := unix.Open(mount, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(root)
	fd := root
	if p != "" {
		fd, err = unix.Openat2(root, p, &unix.OpenHow{
			Flags:   unix.O_PATH | unix.O_NOFOLLOW | unix.O_CLOEXEC,
			Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_XDEV | unix.RESOLVE_NO_MAGICLINKS,
		})
		if err != nil {
			return err
		}
		defer unix.Close(fd)
	}
	var st unix.Stat_t
	return unix.Fstat(fd, &st)
}

// close stops the refresher's child (the server stops).
func (a *attrRefresher) close() {
	if a != nil {
		a.child.close()
	}
}
