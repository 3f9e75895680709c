package rootfs

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/dupsnap/dupsnap/pkg/cow"
	"github.com/dupsnap/dupsnap/pkg/layout"
)

// cowXattr marks an upper file whose data lives in the region. The upper
// file itself is an empty placeholder carrying the metadata (mode, owner,
// times, xattrs, names, links) in overlay format; the value is
// "<region file id hex>[ <base digest> <base size>]". Ids are random, never
// inode numbers: a host inode number can be reused after a crash that
// lost the Remove of the region file, and a reused id would show another
// file's data.
const cowXattr = "trusted.dupsnap.cow"

type cowRef struct {
	id       uint64
	base     digest.Digest // "" for a new file
	baseSize int64
}

func (c cowRef) String() string {
	if c.base == "" {
		return strconv.FormatUint(c.id, 16)
	}
	return fmt.Sprintf("%x %s %d", c.id, c.base, c.baseSize)
}

func parseCowRef(b []byte) (cowRef, bool) {
	f := strings.Fields(string(b))
	if len(f) != 1 && len(f) != 3 {
		return cowRef{}, false
	}
	id, err := strconv.ParseUint(f[0], 16, 64)
	if err != nil {
		return cowRef{}, false
	}
	c := cowRef{id: id}
	if len(f) == 3 {
		c.base = digest.Digest(f[1])
		if c.baseSize, err = strconv.ParseInt(f[2], 10, 64); err != nil || c.base.Validate() != nil {
			return cowRef{}, false
		}
	}
	return c, true
}

// readCowRef reports the region reference of the upper file at p.
func readCowRef(p string) (cowRef, bool) {
	var b [160]byte
	n, err := unix.Lgetxattr(p, cowXattr, b[:])
	if err != nil || n <= 0 {
		return cowRef{}, false
	}
	return parseCowRef(b[:n])
}

func newCowID() uint64 {
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err) // crypto/rand never fails on Linux
	}
	return binary.LittleEndian.Uint64(b[:]) >> 1
}

// cowData is the block CoW write layer: copy-up is metadata only (a
// placeholder naming its base object); data goes to the region.
type cowData struct{ r *rootFS }

func (c cowData) CopyUpData(ctx context.Context, dst *os.File, e *layout.Entry) error {
	if c.r.reflinkUp(ctx, dst, e) {
		return nil // a plain upper file sharing the object's extents (reflink.go)
	}
	_, err := c.r.markCow(dst, e)
	return err
}

// markCow makes the new upper file dst a region file for image entry e
// (empty for a new file) and returns its reference.
func (r *rootFS) markCow(dst *os.File, e *layout.Entry) (cowRef, error) {
	ref := cowRef{id: newCowID()}
	if e.Size > 0 {
		ref.base, ref.baseSize = e.Digest, e.Size
	}
	if err := unix.Fsetxattr(int(dst.Fd()), cowXattr, []byte(ref.String()), 0); err != nil {
		return cowRef{}, fmt.Errorf("mark %s as region file: %w", dst.Name(), err)
	}
	r.cowMu.Lock()
	r.fresh[ref.id] = struct{}{}
	r.cowMu.Unlock()
	return ref, nil
}

// acquireNew is acquire for a file Create just made (ref from markCow):
// its open descriptor becomes the placeholder handle, which saves a path
// lookup, an xattr read and an open per created file.
func (r *rootFS) acquireNew(up string, ref cowRef, meta *os.File) (*cowInode, error) {
	r.cowMu.Lock()
	defer r.cowMu.Unlock()
	if r.open[ref.id] != nil {
		return nil, fmt.Errorf("rootfs: region file %x of %s already open: %w", ref.id, up, syscall.EEXIST)
	}
	ci, err := r.newCowInode(up, ref)
	if err != nil {
		return nil, err
	}
	ci.meta = meta
	r.open[ref.id] = ci
	return ci, nil
}

func (cowData) Open(path string) (dataFile, error) {
	return nil, fmt.Errorf("rootfs: %s: region files have no plain data: %w", path, syscall.EINVAL)
}

// cowInode is the open region state of one inode (all its names and
// handles share it).
type cowInode struct {
	ref  cowRef
	f    *cow.File
	base *os.File // CAS object, nil without a base
	// meta is the placeholder, open: it keeps the host inode (and so the
	// id's upper file) alive while the file is open after its last unlink,
	// and carries mtime updates and fsync of the metadata.
	meta     *os.File
	refs     int  // guarded by rootFS.cowMu
	unlinked bool // last name gone: remove the region file at last release
	dirty    atomic.Bool
	nsDirty  atomic.Bool // names created since the last fsync
	upath    atomic.Pointer[string]
}

// cowState is the region side of rootFS.
type cowState struct {
	region *cow.Region
	cowMu  sync.Mutex
	open   map[uint64]*cowInode
	// fresh: ids whose upper names were created since they were last
	// opened; their first fsync also fsyncs the upper dirs.
	fresh map[uint64]struct{}
	// ops counts region reads/writes since the last sync tick (idle
	// detection for returning memory); wasBusy is syncLoop's own.
	ops     atomic.Int64
	wasBusy bool
	ph      phPool // placeholders made ahead (phpool.go)
}

// acquire returns the open state of the region file of the upper file at
// up, opening (or, after a crash that lost it, recreating) it.
// newCowInode is the open state of region file ref named by up, its
// region file opened (or created). Caller holds cowMu.
func (r *rootFS) newCowInode(up string, ref cowRef) (*cowInode, error) {
	ci := &cowInode{ref: ref, refs: 1}
	ci.upath.Store(&up)
	if _, ok := r.fresh[ref.id]; ok {
		ci.nsDirty.Store(true)
		delete(r.fresh, ref.id)
	}
	f, err := r.region.File(ref.id)
	if errors.Is(err, cow.ErrNotExist) {
		// Never written (or the create was not synced): start from the
		// base (a new file has none).
		if f, err = r.region.Create(ref.id); err == nil && ref.base != "" {
			err = f.SetBase(ref.baseSize)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("rootfs: region file of %s: %w", up, err)
	}
	ci.f = f
	return ci, nil
}

func (r *rootFS) acquire(up string) (*cowInode, error) {
	ref, ok := readCowRef(up)
	if !ok {
		return nil, fmt.Errorf("rootfs: %s is not a region file: %w", up, syscall.EINVAL)
	}
	r.cowMu.Lock()
	defer r.cowMu.Unlock()
	if ci := r.open[ref.id]; ci != nil {
		ci.refs++
		return ci, nil
	}
	ci, err := r.newCowInode(up, ref)
	if err != nil {
		return nil, err
	}
	if ref.base != "" && ref.baseSize > 0 {
		if ci.base, err = r.cas.OpenFile(ref.base); err != nil {
			return nil, fmt.Errorf("rootfs: base of %s: %w", up, err)
		}
	}
	if ci.meta, err = os.OpenFile(up, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NOATIME, 0); err != nil {
		if ci.base != nil {
			ci.base.Close()
		}
		return nil, fmt.Errorf("rootfs: open placeholder %s: %w", up, err)
	}
	r.open[ref.id] = ci
	return ci, nil
}

// release drops one reference; the last one of an unlinked file removes
// its region file.
func (r *rootFS) release(ci *cowInode) {
	ci.touch()
	r.cowMu.Lock()
	defer r.cowMu.Unlock()
	ci.refs--
	if ci.refs > 0 {
		return
	}
	delete(r.open, ci.ref.id)
	if ci.nsDirty.Load() {
		r.fresh[ci.ref.id] = struct{}{} // not fsync'd yet: keep the reminder
	}
	if ci.unlinked {
		if err := r.region.Remove(ci.ref.id); err != nil && !errors.Is(err, cow.ErrNotExist) {
			logErr(context.Background(), "remove region file", *ci.upath.Load(), err)
		}
	} else {
		// Closed: its placement window goes back to the free space, so
		// the next file is placed right after this one's blocks.
		ci.f.TrimReserve()
	}
	if ci.base != nil {
		ci.base.Close()
	}
	ci.meta.Close()
}

// dropped is called after the last name of the upper file st (at up, now
// gone) was removed: its region file goes now, or at its last release.
// Caller holds r.mu.
func (r *rootFS) dropped(ref cowRef) {
	r.cowMu.Lock()
	defer r.cowMu.Unlock()
	if ci := r.open[ref.id]; ci != nil {
		ci.unlinked = true
		return
	}
	if err := r.region.Remove(ref.id); err != nil && !errors.Is(err, cow.ErrNotExist) {
		logErr(context.Background(), "remove region file", ref.String(), err)
	}
}

// liveCow returns the open state of id if some handle has it open.
func (r *rootFS) liveCow(id uint64) *cowInode {
	r.cowMu.Lock()
	defer r.cowMu.Unlock()
	return r.open[id]
}

// touch sets mtime/ctime after data changes. Done lazily (at getattr,
// flush, fsync, release) rather than per write: a utimensat per WRITE
// request would double the cost of small writes.
func (ci *cowInode) touch() {
	if !ci.dirty.Swap(false) {
		return
	}
	futimensNow(int(ci.meta.Fd()))
}

// futimensNow sets atime and mtime of fd to now: utimensat(fd, NULL),
// which x/sys/unix does not offer (its Futimes goes through a
// /proc/self/fd path lookup).
func futimensNow(fd int) {
	ts := [2]unix.Timespec{{Nsec: unix.UTIME_NOW}, {Nsec: unix.UTIME_NOW}}
	unix.Syscall6(unix.SYS_UTIMENSAT, uintptr(fd), 0, uintptr(unsafe.Pointer(&ts[0])), 0, 0, 0)
}

// sync makes the data and metadata of ci durable: the region, the
// placeholder, and (after a copy-up or create) the upper dirs naming it.
func (r *rootFS) syncCow(ci *cowInode) error {
	ci.touch()
	if err := r.region.Sync(); err != nil {
		return err
	}
	if err := ci.meta.Sync(); err != nil {
		return err
	}
	if ci.nsDirty.Swap(false) {
		if err := r.syncUpperDirs(*ci.upath.Load()); err != nil {
			ci.nsDirty.Store(true)
			return err
		}
	}
	return nil
}

// syncUpperDirs fsyncs every dir from p's parent up to the upper root
// (copy-up may have created all of them).
func (r *rootFS) syncUpperDirs(p string) error {
	for d := dirOfAbs(p); len(d) >= len(r.upper); d = dirOfAbs(d) {
		f, err := os.Open(d)
		if err != nil {
			return err
		}
		err = f.Sync()
		f.Close()
		if err != nil {
			return err
		}
		if d == r.upper {
			break
		}
	}
	return nil
}

func dirOfAbs(p string) string {
	i := strings.LastIndexByte(p, '/')
	if i <= 0 {
		return "/"
	}
	return p[:i]
}

// Default region shape when Config.Reserve is 0.
const (
	defaultRegionReserve  = 256 << 10
	defaultRegionGrowStep = 16 << 20
)

// openRegion opens the region of an active snapshot and drops region
// files no upper file names any more (a crash between an unlink and the
// next Sync leaves them behind).
func openRegion(ctx context.Context, cfg Config, upper string) (*cow.Region, error) {
	reserve, step := cfg.Reserve, int64(0)
	if reserve <= 0 {
		// Small by default: a container that changes a few blocks costs a
		// few blocks of disk, not a whole reserve; one that writes more
		// gets room in steps large enough to keep its files contiguous.
		reserve, step = defaultRegionReserve, defaultRegionGrowStep
	}
	reg, err := cow.Open(cfg.regionDir(), cow.Options{MaxSize: cfg.MaxSize, Reserve: reserve, GrowStep: step, BlockSize: cfg.BlockSize})
	if err != nil {
		return nil, fmt.Errorf("rootfs: open region: %w", err)
	}
	ids := reg.Files()
	if len(ids) == 0 {
		return reg, nil
	}
	live := map[uint64]bool{}
	walkUpper(upper, func(p string) {
		if ref, ok := readCowRef(p); ok {
			live[ref.id] = true
		}
	})
	n := 0
	for _, id := range ids {
		if !live[id] {
			if err := reg.Remove(id); err == nil {
				n++
			}
		}
	}
	if n > 0 {
		if err := reg.Sync(); err != nil {
			reg.Close()
			return nil, fmt.Errorf("rootfs: sync region: %w", err)
		}
	}
	return reg, nil
}

// walkUpper calls fn for every regular file below dir.
func walkUpper(dir string, fn func(p string)) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range ents {
		p := dir + "/" + e.Name()
		switch {
		case e.IsDir():
			walkUpper(p, fn)
		case e.Type().IsRegular():
			fn(p)
		}
	}
}

// syncLoop commits the region every interval, so unsynced writes are
// bounded in time (like a local filesystem's commit interval) and Usage
// and Changes, which read the durable state, lag little.
func (r *rootFS) syncLoop(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := r.region.Sync(); err != nil {
				logErr(ctx, "region sync", r.upper, err)
			}
			if err := r.syncFreshNames(); err != nil {
				logErr(ctx, "sync new names", r.upper, err)
			}
			// After a burst of I/O (request buffers of up to MaxWrite
			// each), hand the memory back once things are quiet.
			busy := r.ops.Swap(0)
			if busy == 0 && r.wasBusy {
				debug.FreeOSMemory()
				debug.FreeOSMemory() // sync.Pool buffers survive one GC
			}
			r.wasBusy = busy > 0
		}
	}
}

// freshMax bounds r.fresh: a container that creates many files and never
// fsyncs them would otherwise grow it by one entry per file for its life.
const freshMax = 4096

// syncFreshNames makes every upper name durable at once (syncfs of the
// upper filesystem) when more than freshMax new files wait for their
// first fsync, and forgets them: their fsync then needs no dir syncs.
// Names created while syncfs runs go to the new map and stay tracked.
func (r *rootFS) syncFreshNames() error {
	r.cowMu.Lock()
	if len(r.fresh) <= freshMax {
		r.cowMu.Unlock()
		return nil
	}
	old := r.fresh
	r.fresh = map[uint64]struct{}{}
	r.cowMu.Unlock()
	fd, err := unix.Open(r.upper, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err == nil {
		err = unix.Syncfs(fd)
		unix.Close(fd)
	}
	if err != nil {
		r.cowMu.Lock()
		for id := range old {
			r.fresh[id] = struct{}{}
		}
		r.cowMu.Unlock()
	}
	return err
}

// cowRefOf reports the region reference of upper entry es at path p.
func (r *rootFS) cowRefOf(es *entryState, p string) (cowRef, bool) {
	if r.region == nil || !es.up || es.st.Mode&syscall.S_IFMT != syscall.S_IFREG {
		return cowRef{}, false
	}
	return readCowRef(r.upperPath(p))
}

// truncateCow sets the size of the region file of the upper file at up
// (truncate(2) without an open handle, or ftruncate).
func (r *rootFS) truncateCow(up string, size int64) error {
	ci, err := r.acquire(up)
	if err != nil {
		return err
	}
	defer r.release(ci)
	if err := ci.f.Truncate(size); err != nil {
		return err
	}
	ci.dirty.Store(true)
	return nil
}
