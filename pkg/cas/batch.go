package cas

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/containerd/log"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

// Batch amortises durability over many puts. Its Puts hash in the caller's
// goroutine while one writer goroutine per batch writes temp files (a
// two-stage pipeline: on 2 cores hashing and the syscalls of writing
// overlap). Objects become visible and durable at Commit.
//
// Put/PutExpected may be called from several goroutines at once; Commit and
// Abort must not overlap a Put. A Batch that is neither committed nor
// aborted holds the store's shared lock and keeps its temp files.
type Batch struct {
	s      *Store
	single bool // Store.Put: fdatasync in the writer, no batch-level sync
	strat  syncStrategy

	mu       sync.Mutex
	done     bool
	leased   bool
	jobs     chan job
	wdone    chan struct{}
	werr     error
	pending  map[digest.Digest]*tempObj // kept temps, by content
	order    []*tempObj
	hits     map[string]struct{} // shards of objects found already present
	inflight sync.WaitGroup

	created []*tempObj // every temp the writer created (writer-owned until wdone)
	// kickedBack: the writer started the writeback of every open temp
	// when the batch grew past perFileBigMax (see kick; writer-owned).
	kickedBack bool
	closing    sync.WaitGroup // discarded temps' fds being closed (see closeDiscarded)
	linked     []*tempObj     // named temps made by Link and AdoptFile (no fd; under mu)
}

type syncStrategy int

const (
	syncAuto    syncStrategy = iota
	syncPerFile              // fdatasync every temp, rename, fsync each touched shard dir
	syncFS                   // syncfs, rename all, syncfs
)

// Batches with at most perFileMax new objects use per-file syncs, and so
// do batches of up to perFileBigMax objects averaging perFileBigAvg bytes
// or more; others use two syncfs calls (see Commit for why). Measured on
// the test VM: 40-64 small files (4-44 KiB) commit 1.5-1.8x slower with
// per-file syncs than with syncfs, but the bench layer's 35 objects
// averaging 3.5 MiB committed in ~15 ms instead of ~27 ms (ingest 0.48x ->
// 0.50-0.52x of sha256): for big files each fdatasync writes what must be
// written anyway, while syncfs also waits for other writers' dirty data.
const (
	perFileMax    = 8
	perFileBigMax = 64
	perFileBigAvg = 1 << 20
)

// perFileSync picks the per-file strategy for a batch of objs new objects
// and hits already-stored ones.
func perFileSync(objs []*tempObj, hits int) bool {
	if len(objs) <= perFileMax && hits <= perFileMax {
		return true
	}
	if len(objs) > perFileBigMax || hits > perFileBigMax {
		return false
	}
	var sum int64
	for _, t := range objs {
		sum += t.logical
	}
	return sum >= int64(len(objs))*perFileBigAvg
}

// tempObj is one temp file on its way to becoming an object.
type tempObj struct {
	name    string
	hex     string // set once the content is hashed
	fd      int    // writer-owned
	anon    bool   // O_TMPFILE: no name; fd stays open until linked
	direct  bool   // fd has O_DIRECT (see direct.go)
	enc     *zstd.Encoder
	logical int64
	gone    bool // renamed into place or unlinked: nothing to clean up
}

type jobKind uint8

const (
	jobWhole   jobKind = iota // data is the whole content
	jobChunk                  // next chunk of a stream (creates the file on first)
	jobKeep                   // stream complete: finish and close
	jobDiscard                // stream abandoned or already stored: close and unlink
)

type job struct {
	kind jobKind
	t    *tempObj
	data []byte
	buf  *[]byte // returned to the pool after the write
}

// NewBatch starts a batch. It takes no resources until a Put writes.
func (s *Store) NewBatch() *Batch {
	return &Batch{s: s, pending: map[digest.Digest]*tempObj{}, hits: map[string]struct{}{}}
}

// start takes the shared lock (temp files must not be swept while they are
// live) and starts the writer. Called with b.mu held.
func (b *Batch) start(ctx context.Context) error {
	if b.jobs != nil {
		return nil
	}
	if err := b.s.lk.shared(ctx); err != nil {
		return err
	}
	b.leased = true
	b.jobs = make(chan job, 8)
	b.wdone = make(chan struct{})
	go b.writer()
	return nil
}

func (b *Batch) send(ctx context.Context, j job) error {
	select {
	case b.jobs <- j:
		return nil
	case <-ctx.Done():
		if j.buf != nil {
			putBuf(j.buf)
		}
		return ctx.Err()
	}
}

func (b *Batch) err() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.werr
}

func (b *Batch) setErr(err error) {
	b.mu.Lock()
	if b.werr == nil {
		b.werr = err
	}
	b.mu.Unlock()
}

func (b *Batch) writer() {
	defer close(b.wdone)
	var zbuf []byte
	for j := range b.jobs {
		if b.err() == nil {
			var err error
			zbuf, err = b.do(j, zbuf)
			if err != nil {
				b.setErr(err)
			}
		}
		if j.buf != nil {
			putBuf(j.buf)
		}
	}
}

func (b *Batch) do(j job, zbuf []byte) ([]byte, error) {
	s, t := b.s, j.t
	switch j.kind {
	case jobWhole:
		if err := b.create(t, false); err != nil {
			return zbuf, err
		}
		data := j.data
		if s.opts.Compress {
			zbuf = compressAll(data, zbuf)
			data = zbuf
		}
		if _, err := fdWriter(t.fd).Write(data); err != nil {
			return zbuf, fmt.Errorf("cas: write temp: %w", err)
		}
		return zbuf, b.finish(t)
	case jobChunk:
		if t.fd < 0 {
			if err := b.create(t, s.opts.Compress); err != nil {
				return zbuf, err
			}
			if b.wantDirect() {
				if err := setDirect(t.fd, true); err == nil {
					t.direct = true
				} else {
					s.noDirect.Store(true)
				}
			}
		}
		t.logical += int64(len(j.data))
		if t.enc != nil {
			if _, err := t.enc.Write(j.data); err != nil {
				return zbuf, fmt.Errorf("cas: write temp: %w", err)
			}
		} else if err := b.writeChunk(t, j.data); err != nil {
			return zbuf, err
		}
		if !t.direct {
			b.kick(t.fd, false)
		}
	case jobKeep:
		if t.enc != nil {
			err := t.enc.Close()
			zencPool.Put(t.enc)
			t.enc = nil
			if err != nil {
				return zbuf, fmt.Errorf("cas: compress: %w", err)
			}
			var hdr [zhdrLen]byte
			putZHeader(hdr[:], t.logical)
			if _, err := unix.Pwrite(t.fd, hdr[:], 0); err != nil {
				return zbuf, fmt.Errorf("cas: write header: %w", err)
			}
		}
		return zbuf, b.finish(t)
	case jobDiscard:
		if t.enc != nil {
			t.enc.Reset(nil)
			zencPool.Put(t.enc)
			t.enc = nil
		}
		if t.fd >= 0 {
			if !t.anon {
				unix.Unlinkat(s.tmpFd, t.name, 0)
			}
			t.gone = true
			b.closeDiscarded(t)
		}
	}
	return zbuf, nil
}

// kick starts writeback of what was written so far without waiting for
// it, so the device works while the caller hashes on and Commit's syncs
// find less left to do. Measured on the loaded 2-core test machine, a kick
// after every small file cost about as much writer time as it saved at
// Commit, so by default only streamed (> 1 MiB) objects are kicked, once
// per chunk; whole small files are left to Commit's syncfs.
//
// Nor while the batch may still commit file by file (perFileSync: at most
// perFileBigMax objects): each fdatasync then writes its file anyway, and
// early writeback only spent CPU beside the hashing (durable ingest bench,
// 35 objects of 3.5 MiB average: 0.49-0.60x sha256 without kicks against
// 0.46x with). A batch that grows past that count ends in syncfs: it
// kicks the temps it holds open at once, and its streams from then on.
func (b *Batch) kick(fd int, small bool) {
	if b.s.opts.NoSync || kickMode == kickNone || small && kickMode != kickAll {
		return
	}
	if kickMode == kickStreams && !b.single {
		if len(b.created) <= perFileBigMax {
			return
		}
		if !b.kickedBack {
			// Now bound for syncfs: start the earlier temps' writeback too.
			b.kickedBack = true
			for _, t := range b.created {
				if t.fd >= 0 && t.fd != fd {
					unix.SyncFileRange(t.fd, 0, 0, unix.SYNC_FILE_RANGE_WRITE)
				}
			}
		}
	}
	unix.SyncFileRange(fd, 0, 0, unix.SYNC_FILE_RANGE_WRITE)
}

const (
	kickStreams = iota
	kickAll
	kickNone
)

var kickMode = kickStreams // benchmarks compare the others

// drain stops the writer and waits for it. Called once, by Commit or Abort,
// after every Put has returned.
func (b *Batch) drain() {
	b.mu.Lock()
	b.done = true
	b.mu.Unlock()
	b.inflight.Wait()
	if b.jobs != nil {
		close(b.jobs)
		<-b.wdone
	}
}

// cleanup removes every temp still present and drops the lock.
func (b *Batch) cleanup() {
	b.closing.Wait()
	for _, t := range b.created {
		if t.enc != nil {
			t.enc.Reset(nil)
			zencPool.Put(t.enc)
			t.enc = nil
		}
		if t.fd >= 0 {
			b.s.releaseFd(t)
		}
		if !t.gone && !t.anon {
			unix.Unlinkat(b.s.tmpFd, t.name, 0)
		}
	}
	b.created = nil
	for _, t := range b.linked {
		if !t.gone {
			unix.Unlinkat(b.s.tmpFd, t.name, 0)
		}
	}
	b.linked = nil
	if b.leased {
		b.leased = false
		b.s.lk.unshare()
	}
}

// Abort discards everything put through the batch that was not committed.
func (b *Batch) Abort() {
	b.mu.Lock()
	if b.done {
		b.mu.Unlock()
		return
	}
	b.mu.Unlock()
	b.drain()
	b.cleanup()
}

// Commit makes every object put through the batch visible under its final
// name and durable, then releases the batch.
//
// Durability with syncfs (big batches): temps are written without any
// fsync. (1) syncfs(2) on the store's filesystem returns after all their
// data and inodes are on stable storage (and, since Linux 5.8, reports
// writeback errors). (2) Each temp gets its final name - linkat(2) of the
// O_TMPFILE inode, or rename with RENAME_NOREPLACE (link(2)+unlink where
// unsupported) of a named temp: an existing object is never replaced, and every final name now points at content already durable, so
// a crash from here on can lose a name but never expose a partial object.
// (3) A second syncfs makes the new names durable before Commit returns.
// Two journal commits per batch instead of one fdatasync per object plus
// one fsync per shard directory, which on ext4 costs a journal commit each.
// The price: syncfs also flushes other writers' dirty data on the same
// filesystem. Small batches (and Store.Put) use per-file syncs instead.
//
// Objects the batch found already present are covered too: their name may
// have been linked by a concurrent batch that has not yet made it durable,
// so their shard directories are synced as well.
func (b *Batch) Commit(ctx context.Context) error {
	b.mu.Lock()
	if b.done {
		b.mu.Unlock()
		return errors.New("cas: batch already committed or aborted")
	}
	b.mu.Unlock()
	b.drain()
	defer b.cleanup()
	if b.werr != nil {
		return b.werr
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	s := b.s
	objs := b.order
	if s.opts.NoSync {
		return s.installAll(objs, false)
	}
	strat := b.strat
	if strat == syncAuto {
		strat = syncFS
		if b.single || perFileSync(objs, len(b.hits)) {
			strat = syncPerFile
		}
	}
	if len(objs) == 0 && len(b.hits) == 0 {
		return nil
	}
	switch strat {
	case syncFS:
		if len(objs) > 0 {
			if err := s.syncfs(); err != nil {
				return err
			}
			if err := s.installAll(objs, false); err != nil {
				return err
			}
		}
		if err := s.syncfs(); err != nil {
			return err
		}
	default:
		if !b.single {
			if err := s.syncTemps(objs); err != nil {
				return err
			}
		}
		if err := s.installAll(objs, true); err != nil {
			return err
		}
		// A linked O_TMPFILE inode's new link count is in the inode, not
		// in the directory: sync it too (without a journal, the directory
		// fsync alone would not write it).
		if err := s.syncLinked(objs); err != nil {
			return err
		}
		shards := b.hits
		for _, t := range objs {
			shards[t.hex[:2]] = struct{}{}
		}
		if err := s.syncShards(shards); err != nil {
			return err
		}
	}
	log.G(ctx).WithField("objects", len(objs)).Trace("cas: batch committed")
	return nil
}

func (s *Store) syncfs() error {
	if err := unix.Syncfs(s.rootFd); err != nil {
		return fmt.Errorf("cas: syncfs %s: %w", s.root, err)
	}
	return nil
}

// parallel runs fn over n items with a few goroutines: syncs wait on the
// device, not the CPU, so they overlap well even on 2 cores.
func parallel(n int, fn func(i int) error) error {
	const workers = 16
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		first error
		next  int
	)
	for w := 0; w < min(workers, n); w++ {
		wg.Go(func() {
			for {
				mu.Lock()
				i := next
				next++
				stop := first != nil
				mu.Unlock()
				if i >= n || stop {
					return
				}
				if err := fn(i); err != nil {
					mu.Lock()
					if first == nil {
						first = err
					}
					mu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	return first
}

func (s *Store) syncTemps(objs []*tempObj) error {
	return parallel(len(objs), func(i int) error {
		if objs[i].anon {
			if err := unix.Fdatasync(objs[i].fd); err != nil {
				return fmt.Errorf("cas: fdatasync temp: %w", err)
			}
			return nil
		}
		fd, err := unix.Openat(s.tmpFd, objs[i].name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("cas: open temp for sync: %w", err)
		}
		defer unix.Close(fd)
		if err := unix.Fdatasync(fd); err != nil {
			return fmt.Errorf("cas: fdatasync temp: %w", err)
		}
		return nil
	})
}

func (s *Store) syncLinked(objs []*tempObj) error {
	return parallel(len(objs), func(i int) error {
		t := objs[i]
		if t.fd < 0 {
			return nil
		}
		err := unix.Fsync(t.fd)
		s.releaseFd(t)
		if err != nil {
			return fmt.Errorf("cas: fsync %s: %w", t.hex, err)
		}
		return nil
	})
}

func (s *Store) syncShards(shards map[string]struct{}) error {
	list := make([]string, 0, len(shards))
	for sh := range shards {
		list = append(list, sh)
	}
	return parallel(len(list), func(i int) error {
		fd, err := unix.Openat(s.objFd, list[i], unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("cas: open shard %s: %w", list[i], err)
		}
		defer unix.Close(fd)
		if err := unix.Fsync(fd); err != nil {
			return fmt.Errorf("cas: fsync shard %s: %w", list[i], err)
		}
		return nil
	})
}

func (s *Store) installAll(objs []*tempObj, keepFds bool) error {
	for _, t := range objs {
		if err := s.install(t, keepFds); err != nil {
			return err
		}
	}
	return nil
}
