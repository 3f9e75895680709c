package rootfs

import (
	"context"
	"errors"
	"fmt"
	stdlog "log"
	"os"
	"runtime/debug"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/log"
	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/dupsnap/dupsnap/internal/phases"
	"github.com/dupsnap/dupsnap/pkg/cas"
	"github.com/dupsnap/dupsnap/pkg/cow"
	"github.com/dupsnap/dupsnap/pkg/layout"
)

// loadTree returns the merged tree of cfg.Layers: from the tree cache if
// it has the chain (cached reports that), else by merging the manifests.
func loadTree(ctx context.Context, cfg Config, ph *phases.Timer) (tree *layout.Tree, _ *cas.Store, cached bool, err error) {
	store, err := cas.Open(cfg.CASRoot, cas.Options{})
	if err != nil {
		return nil, nil, false, fmt.Errorf("rootfs: open cas: %w", err)
	}
	defer func() {
		if err != nil {
			store.Close()
		}
	}()
	ms, err := layout.OpenStore(cfg.ManifestRoot, store)
	if err != nil {
		return nil, nil, false, fmt.Errorf("rootfs: open manifest store: %w", err)
	}
	ph.Mark("open")
	// A layer that is gone fails the start with or without a cached tree.
	for _, d := range cfg.Layers {
		if !ms.Has(d) {
			return nil, nil, false, fmt.Errorf("rootfs: layer %s: %w", d, layout.ErrNotFound)
		}
	}
	if tree = loadTreeCache(cfg.ManifestRoot, cfg.Layers); tree != nil {
		ph.Mark("cached")
		return tree, store, true, nil
	}
	chain := make([]*layout.Manifest, 0, len(cfg.Layers))
	for _, d := range cfg.Layers {
		m, err := ms.Get(ctx, d)
		if err != nil {
			return nil, nil, false, fmt.Errorf("rootfs: layer %s: %w", d, err)
		}
		chain = append(chain, m)
	}
	ph.Mark("manifests")
	tree, err = layout.Merge(chain)
	if err != nil {
		return nil, nil, false, fmt.Errorf("rootfs: merge layers: %w", err)
	}
	fixRoot(tree)
	ph.Mark("merge")
	return tree, store, false, nil
}

// fixRoot gives a merged tree the root directory a mount needs.
func fixRoot(tree *layout.Tree) {
	if tree.Root == nil {
		tree.Root = &layout.Node{Ino: 1}
	}
	if tree.Root.Entry.Type != layout.TypeDir {
		tree.Root.Entry.Type = layout.TypeDir
	}
	if tree.Root.Children == nil {
		tree.Root.Children = map[string]*layout.Node{}
	}
	if tree.Root.Entry.Mode == 0 {
		tree.Root.Entry.Mode = 0o755
	}
}

// prepareState creates the upper and work dirs of an active snapshot
// (cfg.upperDir() "": none); a new upper root gets the image root's
// metadata. It needs no rootFS, so it runs beside newRootFS.
func prepareState(cfg Config, root *layout.Entry) error {
	upper, work := cfg.upperDir(), cfg.workDir()
	if upper == "" {
		return nil
	}
	if err := os.MkdirAll(work, 0o700); err != nil {
		return fmt.Errorf("rootfs: state dir: %w", err)
	}
	// Leftovers of a copy-up interrupted by a crash.
	if ents, err := os.ReadDir(work); err == nil {
		for _, e := range ents {
			os.RemoveAll(work + "/" + e.Name())
		}
	}
	if _, err := os.Lstat(upper); err == nil {
		return nil
	}
	// Not one of rootFS.tmpName's names: the work dir is empty here.
	tmp := work + "/tmp-upper-root"
	if err := os.Mkdir(tmp, 0o700); err != nil {
		return fmt.Errorf("rootfs: create upper dir: %w", err)
	}
	if err := setMeta(tmp, root); err != nil {
		os.RemoveAll(tmp)
		return fmt.Errorf("rootfs: create upper dir: %w", err)
	}
	if err := os.Rename(tmp, upper); err != nil {
		return fmt.Errorf("rootfs: create upper dir: %w", err)
	}
	return nil
}

// mountOptions are the FUSE options of every dupsnap rootfs.
func mountOptions(cfg Config) *fs.Options {
	t := cacheTimeout
	o := &fs.Options{
		MountOptions: fuse.MountOptions{
			AllowOther:   true,
			FsName:       "dupsnap",
			Name:         "dupsnap",
			Options:      []string{"default_permissions", "dev", "suid"},
			MaxReadAhead: 1 << 20,
			MaxWrite:     1 << 20,
			DirectMount:  true,
			Debug:        cfg.Debug,
			// Every change of file data goes through this mount (image
			// content never changes; region files change only here), so
			// the page cache stays valid when mtime or size move: without
			// this the lazy mtime update of a written region file made the
			// kernel drop all its cached pages at the next getattr, and
			// the first read after a write ran at daemon speed.
			ExplicitDataCacheControl: true,
			// A symlink never changes in place (a new one is a new inode),
			// so the kernel may keep readlink results: every exec through
			// /bin/sh -> busybox style links otherwise costs a round trip.
			EnableSymlinkCaching: true,
			ExtraCapabilities:    fuse.CAP_HANDLE_KILLPRIV_V2,
			// Passthrough is negotiated by go-fuse when the kernel offers
			// it (CAP_PASSTHROUGH) and used for handles with PassthroughFd.
		},
		EntryTimeout:    &t,
		AttrTimeout:     &t,
		NegativeTimeout: &t,
		RootStableAttr:  &fs.StableAttr{Ino: 1},
	}
	if cfg.Debug {
		// Microseconds: the debug log is how a container start's requests
		// are timed.
		o.MountOptions.Logger = stdlog.New(os.Stderr, "", stdlog.Ldate|stdlog.Lmicroseconds)
		o.Logger = o.MountOptions.Logger
	}
	if cfg.ReadOnly {
		o.DirectMountFlags = syscall.MS_RDONLY
		o.Options = append(o.Options, "ro")
	}
	return o
}

// loadMemoryLimit caps the heap while GC is off during a server's start.
const loadMemoryLimit = 128 << 20

type regionResult struct {
	reg   *cow.Region
	err   error
	spare bool          // taken from the pool
	took  time.Duration // in its goroutine, beside the tree's load
}

// statsInterval is how often the server publishes its operation counts.
var statsInterval = 5 * time.Second // a var so tests can shorten it

// syncInterval bounds how long an unsynced write may stay only in memory.
const syncInterval = 2 * time.Second

// Serve mounts and serves in this process until ctx is done or the fs is
// unmounted. A server started by Start tells it through the inherited
// ready pipe (see ready.go) once the mount can be used.
func Serve(ctx context.Context, cfg Config) error { return servePre(ctx, cfg, nil) }

// ServePreloaded is Serve for a spare that preloaded pre (may be nil).
func ServePreloaded(ctx context.Context, cfg Config, pre *Preloaded) error {
	return servePre(ctx, cfg, pre)
}

func servePre(ctx context.Context, cfg Config, pre *Preloaded) error {
	ready := takeReadyPipe()
	defer ready.Close() // EOF for Start if we fail before signalling
	if err := cfg.validate(); err != nil {
		return err
	}
	ph := newPhases()
	// The start is short and allocates a lot at once: no GC cycles during
	// it (bounded by a memory limit), the garbage goes after ready.
	gcPercent := debug.SetGCPercent(-1)
	memLimit := debug.SetMemoryLimit(loadMemoryLimit)
	restoreGC := sync.OnceFunc(func() {
		debug.SetGCPercent(gcPercent)
		debug.SetMemoryLimit(memLimit)
	})
	defer restoreGC()
	// A new region's journal and dirs are fsync'd: that disk wait runs
	// while the tree loads.
	var regCh chan regionResult
	if cfg.StateDir != "" && !cfg.ReadOnly {
		regCh = make(chan regionResult, 1)
		go func() {
			t0 := time.Now()
			spare := takeSpareRegion(cfg)
			reg, err := openRegion(ctx, cfg, cfg.upperDir())
			if err != nil && spare {
				err = fmt.Errorf("%w (a spare region from the pool)", err)
			}
			regCh <- regionResult{reg, err, spare, time.Since(t0)}
		}()
	}
	closeRegion := func() {
		if regCh != nil {
			if res := <-regCh; res.reg != nil {
				res.reg.Close()
			}
		}
	}
	tree, links, store, pm := pre.take(cfg)
	cached, preloaded := tree != nil, tree != nil
	if preloaded {
		ph.Mark("preloaded")
	} else {
		var err error
		if tree, store, cached, err = loadTree(ctx, cfg, ph); err != nil {
			closeRegion()
			return err
		}
	}
	defer store.Close()
	defer pm.discard() // unless attached below
	fixRoot(tree)
	var upperErr error
	upperDone := make(chan struct{})
	go func() {
		defer close(upperDone)
		upperErr = prepareState(cfg, &tree.Root.Entry)
	}()
	r := newRootFS(tree, store, cfg, links)
	ph.Mark("newfs")
	<-upperDone
	if upperErr != nil {
		closeRegion()
		return upperErr
	}
	ph.Mark("upper")
	regionNote := ""
	if regCh != nil {
		res := <-regCh
		if res.err != nil {
			return res.err
		}
		reg := res.reg
		r.region = reg
		regionNote = fmt.Sprintf("spare=%v took=%v", res.spare, res.took.Round(10*time.Microsecond))
		defer func() {
			r.refresh.close()
			r.closePlaceholders()
			if err := reg.Close(); err != nil {
				log.G(ctx).WithError(err).Warn("rootfs: close region")
			}
		}()
		sctx, scancel := context.WithCancel(context.Background())
		defer scancel()
		go r.syncLoop(sctx, syncInterval)
	}
	ph.Mark("state")
	if cfg.onFS != nil {
		cfg.onFS(r)
	}
	var (
		server     *fuse.Server
		st         *opStats
		premounted bool
	)
	if pm != nil {
		// Mounted ahead (premount.go): only attached here.
		if err := pm.attach(r, cfg.Mountpoint); err != nil {
			log.G(ctx).WithError(err).Warn("rootfs: premounted fs not attached, mounting anew")
			r.srv = nil
			pm.discard() // its server ends now, not when this one does
		} else {
			server, st, premounted = pm.server, pm.st, true
			ph.Mark("attached")
			ready.signal()
			if err := pollHack(cfg.Mountpoint); err != nil {
				// Only this process's own opens of the mount need it.
				log.G(ctx).WithError(err).Warn("rootfs: poll hack failed")
			}
			ph.Mark("mount")
		}
	}
	if server == nil {
		root := &node{r: r, lower: tree.Root}
		opts := mountOptions(cfg)
		st = newOpStats()
		// Start's caller may go on once the mount exists (earlyready.go).
		stopWatch := func() {}
		if ready != nil {
			stopWatch = watchMount(cfg.Mountpoint, func() {
				ph.Mark("mounted")
				ready.signal()
			})
		}
		var err error
		server, err = mountCounted(cfg.Mountpoint, root, opts, st)
		if err != nil && cfg.ReadOnly {
			// "ro" is a flag for mount(2) but fusermount wants it as option;
			// retry without the string form if the kernel refused it.
			opts.Options = opts.Options[:len(opts.Options)-1]
			server, err = mountCounted(cfg.Mountpoint, root, opts, st)
		}
		stopWatch()
		if err != nil {
			return fmt.Errorf("rootfs: mount %s: %w", cfg.Mountpoint, err)
		}
		ph.Mark("mount")
	}
	// An in-process caller must not touch the mount before this point: a
	// Go open(2) of a FUSE file registers it with the runtime's epoll while
	// holding a P, and until go-fuse's poll hack (in WaitMount) has made the
	// kernel stop sending POLL, that epoll_ctl waits for this very server,
	// which a stop-the-world GC keeps from running: a deadlock.
	if cfg.ready != nil {
		close(cfg.ready)
	}
	ready.signal()
	restoreGC()
	log.G(ctx).WithField("mountpoint", cfg.Mountpoint).WithField("layers", len(cfg.Layers)).
		WithField("cached_tree", cached).WithField("preloaded", preloaded).WithField("premounted", premounted).WithField("phases", ph.String()).WithField("region", regionNote).WithField("wake", assignReadAt.Sub(assignedAt).Round(10*time.Microsecond)).Info("rootfs: serving")
	// Everything below is off the container's start path. Serve waits
	// for its helpers before it returns (they write next to the state).
	var bg sync.WaitGroup
	bctx, bcancel := context.WithCancel(ctx)
	defer func() { bcancel(); bg.Wait() }()
	// Niced threads (prio.go): the container is starting right now.
	if regCh != nil {
		bg.Go(func() { lowerThread(); refillRegionPool(bctx, cfg) })
	}
	bg.Go(func() {
		lowerThread()
		if cached {
			touchTreeCache(cfg.ManifestRoot, cfg.Layers)
		} else if err := storeTreeCache(cfg.ManifestRoot, cfg.Layers, tree); err != nil {
			log.G(ctx).WithError(err).Warn("rootfs: tree cache not written")
		}
	})
	if !cfg.ReadOnly {
		// Views have no region files: everything there is passthrough.
		if err := setReadahead(cfg.Mountpoint, readaheadKiB); err != nil {
			log.G(ctx).WithError(err).Warn("rootfs: readahead window stays at the default")
		}
	}
	// Loading the tree leaves garbage (several times its size when the
	// manifests were merged); hand it back once the container has
	// started, not at some later GC: one of these processes idles next to
	// every container.
	freeTimer := time.AfterFunc(freeOSMemoryDelay, debug.FreeOSMemory)
	defer freeTimer.Stop()
	pctx, pcancel := context.WithCancel(context.Background())
	pdone := make(chan struct{})
	go func() {
		st.publishLoop(pctx, StatsPath(cfg.Mountpoint), statsInterval)
		close(pdone)
	}()
	defer func() { pcancel(); <-pdone }() // the last publish lands before Serve returns
	done := make(chan struct{})
	go func() {
		server.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
	}
	if err := unmountServer(server, cfg.Mountpoint, premounted); err != nil {
		log.G(ctx).WithError(err).Warn("rootfs: unmount busy, detaching")
		if err := syscall.Unmount(cfg.Mountpoint, syscall.MNT_DETACH); err != nil && !errors.Is(err, syscall.EINVAL) {
			return fmt.Errorf("rootfs: unmount %s: %w", cfg.Mountpoint, err)
		}
	}
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		return fmt.Errorf("rootfs: server of %s did not stop", cfg.Mountpoint)
	}
	return nil
}
