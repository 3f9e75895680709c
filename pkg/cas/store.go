package cas

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync/atomic"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

// On-disk layout under root:
//
//	objects/sha256/<2 hex>/<64 hex>      uncompressed object (0444)
//	objects/sha256/<2 hex>/<64 hex>.zst  compressed object (0444, see compress.go)
//	tmp/                                 temp files of puts in flight
//	lock                                 flock: shared = lease/put, exclusive = collect/sweep
const (
	objectsDir = "objects/sha256"
	tmpDirName = "tmp"
	lockName   = "lock"
	zstSuffix  = ".zst"
	objectMode = 0o444
)

// Store is a content-addressed store of file contents. See api.go.
type Store struct {
	root string
	opts Options

	rootFd int // syncfs target: any fd on the store's filesystem
	objFd  int // objects/sha256, for *at(2) calls with "ab/<hex>" names
	tmpFd  int // tmp

	lk sharedLock

	// fixMode is set when the umask would strip bits from 0444, so new
	// objects need an explicit fchmod.
	fixMode   bool
	tmpPrefix string
	tmpSeq    atomic.Uint64
	// noReplaceUnsupported flips when renameat2(RENAME_NOREPLACE) returns
	// EINVAL (filesystem without support); we fall back to link+unlink.
	noReplaceUnsupported atomic.Bool
	// O_TMPFILE temps (see temp.go): unsupported flag, open count, cap.
	noTmpfile atomic.Bool
	anonOpen  atomic.Int64
	maxAnon   int64
	// noDirect flips when O_DIRECT is refused (see direct.go).
	noDirect atomic.Bool
	// tempsCreated counts temp files ever created (tests: "writes nothing").
	tempsCreated atomic.Int64
	// directWrites counts O_DIRECT writes (tests).
	directWrites atomic.Int64
}

// Open opens (creating if needed) the store at root. Temp files left by a
// crashed writer are removed when no other process holds a lease.
func Open(root string, opts Options) (*Store, error) {
	root, err := filepath.Abs(root)
	if err != nil {
		return nil, fmt.Errorf("cas: open %s: %w", root, err)
	}
	created, err := ensureLayout(root, opts.NoSync)
	if err != nil {
		return nil, err
	}
	s := &Store{root: root, opts: opts, rootFd: -1, objFd: -1, tmpFd: -1}
	var prefix [6]byte
	if _, err := rand.Read(prefix[:]); err != nil {
		return nil, fmt.Errorf("cas: temp prefix: %w", err)
	}
	s.tmpPrefix = hex.EncodeToString(prefix[:]) + "-"
	s.fixMode = umask()&objectMode != 0
	s.maxAnon = 512
	var rl unix.Rlimit
	if unix.Getrlimit(unix.RLIMIT_NOFILE, &rl) == nil && rl.Cur/4 > 512 {
		s.maxAnon = int64(min(rl.Cur/4, 1<<16))
	}
	if err := s.openFds(); err != nil {
		s.Close()
		return nil, err
	}
	if err := s.lk.init(filepath.Join(root, lockName)); err != nil {
		s.Close()
		return nil, err
	}
	n, err := s.sweepTemps()
	if err != nil {
		s.Close()
		return nil, err
	}
	if n > 0 || created {
		log.L.WithField("root", root).Debugf("cas: opened store (created=%v, removed %d stale temp files)", created, n)
	}
	return s, nil
}

func ensureLayout(root string, nosync bool) (created bool, err error) {
	if err := os.MkdirAll(root, 0o755); err != nil {
		return false, fmt.Errorf("cas: create root: %w", err)
	}
	if _, err := os.Stat(filepath.Join(root, tmpDirName)); errors.Is(err, os.ErrNotExist) {
		spreadSubdirs(root)
	}
	if err := mkdirSpread(root, tmpDirName); err == nil {
		created = true
	} else if !errors.Is(err, os.ErrExist) {
		return false, fmt.Errorf("cas: create tmp: %w", err)
	}
	for _, d := range []string{"objects", objectsDir} {
		if err := os.Mkdir(filepath.Join(root, d), 0o755); err == nil {
			created = true
		} else if !errors.Is(err, os.ErrExist) {
			return false, fmt.Errorf("cas: create %s: %w", d, err)
		}
	}
	// All 256 shard directories exist from the start, so a put never has to
	// create (and fsync) a directory on its hot path.
	base := filepath.Join(root, objectsDir)
	// Shards are made in order, so "ff" existing means all do.
	if _, err := os.Lstat(filepath.Join(base, "ff")); err == nil && !created {
		return false, nil
	}
	for i := 0; i < 256; i++ {
		p := filepath.Join(base, fmt.Sprintf("%02x", i))
		if err := os.Mkdir(p, 0o755); err == nil {
			created = true
		} else if !errors.Is(err, os.ErrExist) {
			return false, fmt.Errorf("cas: create shard: %w", err)
		}
	}
	if created && !nosync {
		for _, d := range []string{base, filepath.Join(root, "objects"), root, filepath.Dir(root)} {
			if err := fsyncDir(d); err != nil {
				return false, err
			}
		}
	}
	return created, nil
}

// mkdirSpread creates root/name under a random name first: ext4's Orlov
// allocator picks a top directory's block group from a hash of its name,
// so every store's "tmp" would otherwise share one group (and its freshly
// deleted inodes; see spreadSubdirs).
func mkdirSpread(root, name string) error {
	dst := filepath.Join(root, name)
	if _, err := os.Lstat(dst); err == nil {
		return os.ErrExist
	}
	var r [8]byte
	rand.Read(r[:])
	tmp := filepath.Join(root, "."+name+"-"+hex.EncodeToString(r[:]))
	if err := os.Mkdir(tmp, 0o755); err != nil {
		return err
	}
	if err := unix.Renameat2(unix.AT_FDCWD, tmp, unix.AT_FDCWD, dst, unix.RENAME_NOREPLACE); err != nil {
		os.Remove(tmp)
		if errors.Is(err, unix.EEXIST) {
			return os.ErrExist
		}
		if !errors.Is(err, unix.EINVAL) {
			return err
		}
		return os.Mkdir(dst, 0o755) // no RENAME_NOREPLACE here: plain mkdir
	}
	return nil
}

// fsTopdirFl is FS_TOPDIR_FL (linux/fs.h): "top of directory hierarchy".
const fsTopdirFl = 0x00020000

// spreadSubdirs marks root as a top directory on ext4 (best effort; other
// filesystems ignore or refuse it), so the Orlov allocator puts tmp/ - where
// every object's inode is allocated - in a block group of its own instead
// of next to its parent. Measured here (ext4 without a journal, many
// processes creating and deleting files under /tmp): the allocator skips
// inodes deleted in the last seconds one by one, and a create next to
// such churn cost ~0.7-1 ms of kernel CPU, against ~20-25 us in a spread
// directory.
func spreadSubdirs(root string) {
	fd, err := unix.Open(root, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return
	}
	defer unix.Close(fd)
	flags, err := unix.IoctlGetInt(fd, unix.FS_IOC_GETFLAGS)
	if err != nil || flags&fsTopdirFl != 0 {
		return
	}
	unix.IoctlSetPointerInt(fd, unix.FS_IOC_SETFLAGS, flags|fsTopdirFl)
}

func (s *Store) openFds() error {
	var err error
	flags := unix.O_RDONLY | unix.O_DIRECTORY | unix.O_CLOEXEC
	if s.rootFd, err = unix.Open(s.root, flags, 0); err != nil {
		return fmt.Errorf("cas: open root: %w", err)
	}
	if s.objFd, err = unix.Open(filepath.Join(s.root, objectsDir), flags, 0); err != nil {
		return fmt.Errorf("cas: open objects dir: %w", err)
	}
	if s.tmpFd, err = unix.Open(filepath.Join(s.root, tmpDirName), flags, 0); err != nil {
		return fmt.Errorf("cas: open tmp dir: %w", err)
	}
	return nil
}

// Root is the store's root directory.
func (s *Store) Root() string { return s.root }

// Close releases the store's descriptors. Batches and leases must be done.
func (s *Store) Close() error {
	for _, fd := range []*int{&s.rootFd, &s.objFd, &s.tmpFd} {
		if *fd >= 0 {
			unix.Close(*fd)
			*fd = -1
		}
	}
	return s.lk.close()
}

// Path is where the object file is, whether or not it exists: the
// uncompressed name for a plain store, the ".zst" name for a compressing
// store. It is "" for a digest that is not a valid sha256 digest.
func (s *Store) Path(d digest.Digest) string {
	h, err := hexOf(d)
	if err != nil {
		return ""
	}
	name := relName(h)
	if s.opts.Compress {
		name += zstSuffix
	}
	return filepath.Join(s.root, objectsDir, name)
}

// relName is an object's name relative to objects/sha256.
func relName(h string) string { return h[:2] + "/" + h }

func hexOf(d digest.Digest) (string, error) {
	if d.Algorithm() != digest.SHA256 {
		return "", fmt.Errorf("cas: digest %q: only sha256 is supported: %w", d, errdefs.ErrInvalidArgument)
	}
	if err := d.Validate(); err != nil {
		return "", fmt.Errorf("cas: digest %q: %v: %w", d, err, errdefs.ErrInvalidArgument)
	}
	return d.Encoded(), nil
}

// newTempName returns a name unique across processes: a random per-Store
// prefix plus a counter (O_EXCL catches the impossible collision).
func (s *Store) newTempName() string {
	return s.tmpPrefix + strconv.FormatUint(s.tmpSeq.Add(1), 36)
}

// sweepTemps removes every temp file, but only under the exclusive lock: a
// temp file may belong to a live put in another process, and every put
// holds the shared lock while it has temp files. It gives up (returning 0)
// if anyone holds a lease.
func (s *Store) sweepTemps() (int, error) {
	release, ok, err := s.lk.tryExclusive()
	if err != nil || !ok {
		return 0, err
	}
	defer release()
	return s.sweepTempsLocked()
}

func (s *Store) sweepTempsLocked() (int, error) {
	names, err := readDirNames(filepath.Join(s.root, tmpDirName))
	if err != nil {
		return 0, err
	}
	n := 0
	for _, name := range names {
		if err := unix.Unlinkat(s.tmpFd, name, 0); err != nil && !errors.Is(err, unix.ENOENT) {
			return n, fmt.Errorf("cas: remove stale temp %s: %w", name, err)
		}
		n++
	}
	return n, nil
}

func fileFromFd(fd int, name string) *os.File { return os.NewFile(uintptr(fd), name) }

func readDirNames(dir string) ([]string, error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("cas: read dir: %w", err)
	}
	defer f.Close()
	names, err := f.Readdirnames(-1)
	if err != nil {
		return nil, fmt.Errorf("cas: read dir %s: %w", dir, err)
	}
	return names, nil
}

func fsyncDir(dir string) error {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("cas: open dir for fsync: %w", err)
	}
	defer unix.Close(fd)
	if err := unix.Fsync(fd); err != nil {
		return fmt.Errorf("cas: fsync dir %s: %w", dir, err)
	}
	return nil
}

// umask reads the process umask without changing it (umask(2) can only be
// read by setting it, which races with other goroutines creating files).
func umask() int {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0o777 // unknown: always fchmod
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		if v, ok := bytes.CutPrefix(sc.Bytes(), []byte("Umask:")); ok {
			m, err := strconv.ParseUint(string(bytes.TrimSpace(v)), 8, 32)
			if err != nil {
				return 0o777
			}
			return int(m)
		}
	}
	return 0o777
}
