package rootfs

import (
	"container/list"
	"context"
	"os"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/opencontainers/go-digest"
)

// backing is the CAS object of a clean image file opened with
// passthrough, and its backing id registered with the kernel. Both are
// kept across opens (go-fuse's own registration opens the object and
// registers it at every open after the last close, and undoes both at the
// release): an OPEN of a file whose backing is still registered does no
// syscall. Idle backings (no open handle) are kept up to maxIdleBackings
// per mount, least recently used first out.
type backing struct {
	mu    sync.Mutex
	f     *os.File
	id    int32 // 0: not registered (passthrough unavailable: plain reads)
	users int
	idle  *list.Element // in rootFS.idle while users == 0 and f != nil
}

var maxIdleBackings = 256 // a var for tests

// backings is the per-mount state of backing (embedded in rootFS).
type backings struct {
	srv     *fuse.Server // set before the first request
	idleMu  sync.Mutex
	idle    list.List   // of *node, most recently released first
	pending sync.Map    // OPEN request's cancel channel -> backing id, for passthroughOpen
	noPT    atomic.Bool // registration failed once: no passthrough on this mount
}

// acquireBacking returns n's CAS object (digest d) and its backing id
// (0 if passthrough is unavailable), counting a user.
func (n *node) acquireBacking(d digest.Digest) (*os.File, int32, syscall.Errno) {
	b, r := &n.bk, n.r
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.f == nil {
		f, err := r.cas.OpenFile(d)
		if err != nil {
			logErr(context.Background(), "open object", d.String(), err)
			return nil, 0, syscall.EIO
		}
		b.f = f
		if r.srv != nil && !r.noPT.Load() {
			id, errno := r.srv.RegisterBackingFd(&fuse.BackingMap{Fd: int32(f.Fd())})
			if errno != 0 {
				r.noPT.Store(true) // not root, or no CAP_PASSTHROUGH: plain reads
			} else {
				b.id = id
			}
		}
	}
	b.users++
	if b.idle != nil {
		r.idleMu.Lock()
		r.idle.Remove(b.idle)
		r.idleMu.Unlock()
		b.idle = nil
	}
	return b.f, b.id, 0
}

// releaseBacking drops a user of n's backing; an idle backing stays
// registered until too many others are idle.
func (n *node) releaseBacking() {
	b, r := &n.bk, n.r
	var evict []*node
	b.mu.Lock()
	b.users--
	if b.id != 0 {
		r.refresh.add(n) // passthrough reads dropped the file's atime in the kernel
	}
	if b.users == 0 && b.f != nil {
		r.idleMu.Lock()
		b.idle = r.idle.PushFront(n)
		for r.idle.Len() > maxIdleBackings {
			e := r.idle.Back()
			o := r.idle.Remove(e).(*node)
			o.bk.idle = nil // o.bk.mu is not held: closeIdle re-checks
			evict = append(evict, o)
		}
		r.idleMu.Unlock()
	}
	b.mu.Unlock()
	for _, o := range evict {
		o.closeIdleBacking()
	}
}

// closeIdleBacking unregisters and closes n's backing unless it was
// taken again (or went back to the idle list) since it was evicted.
func (n *node) closeIdleBacking() {
	b := &n.bk
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.users > 0 || b.idle != nil || b.f == nil {
		return
	}
	if b.id != 0 && n.r.srv != nil {
		n.r.srv.UnregisterBackingFd(b.id)
	}
	b.f.Close()
	b.f, b.id = nil, 0
}

// passthroughOpen records the backing id an OPEN's reply must carry: the
// node's Open runs inside go-fuse's bridge, which fills the reply only for
// handles it registered itself; countedFS.Open adds it (see takePending).
func (r *rootFS) passthroughOpen(ctx context.Context, id int32) {
	if c, ok := ctx.(*fuse.Context); ok && c != nil && id != 0 && c.Cancel != nil {
		r.pending.Store(c.Cancel, id)
	}
}

// takePending is the backing id recorded for the OPEN with cancel channel c.
func (r *rootFS) takePending(c <-chan struct{}) (int32, bool) {
	if c == nil {
		return 0, false
	}
	v, ok := r.pending.LoadAndDelete(c)
	if !ok {
		return 0, false
	}
	return v.(int32), true
}
