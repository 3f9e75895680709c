// Package cow implements block-granular copy-on-write for one container
// rootfs: a preallocated region (one data file plus a metadata journal in a
// directory) holding the modified blocks of image files and the blocks of new
// files, an extent allocator that keeps each file's blocks together, quota,
// and crash-consistent metadata.
//
// The package knows nothing about FUSE or containerd: files are identified by
// a caller-chosen uint64 (the rootfs inode number), and the read-only base of
// a file (its CAS object) is passed in as an io.ReaderAt on every call that
// may need it, so the region never holds descriptors to CAS objects.
//
// Durability contract: Region.Sync (File.Sync is the same call) makes every
// write that returned before it durable. Data is fdatasync'ed before the
// journal records that point at it are appended and fsync'ed, and a block
// freed by one file is not reused until the free itself is durable, so after
// a crash no file can map a block holding another file's data.
package cow

import (
	"errors"
	"fmt"
	"syscall"
)

const (
	// DefaultBlockSize is the CoW unit.
	DefaultBlockSize = 4096
	// DefaultReserve is the preallocated size of a new region.
	DefaultReserve = 64 << 20
	// DefaultPunchThreshold: freed runs at least this long are punched out
	// of the data file (returned to the host filesystem).
	DefaultPunchThreshold = 1 << 20
	// DefaultJournalLimit: the journal is compacted into a checkpoint once
	// it grows past this (or twice the last checkpoint, whichever is larger).
	DefaultJournalLimit = 4 << 20
	// DefaultMaxPending: a region buffering more metadata records than this
	// commits them (fdatasync + journal append) on its own.
	DefaultMaxPending = 1 << 16
)

// Options configure a Region. Zero values pick the defaults above.
type Options struct {
	// BlockSize is the CoW granularity in bytes (power of two, >= 512).
	// An existing region keeps the block size it was created with.
	BlockSize int
	// Reserve is how many bytes are fallocated up front.
	Reserve int64
	// GrowStep is how much the data file grows when the reserve is used up
	// (default: Reserve, at least 1 MiB).
	GrowStep int64
	// MaxSize caps the data file (the quota); 0 means unlimited. Writes that
	// would need more fail with an error wrapping syscall.ENOSPC.
	MaxSize int64
	// PunchThreshold: freed runs of at least this many bytes are punched out.
	// Negative disables punching.
	PunchThreshold int64
	// FileReserve is the minimum per-file placement window in bytes (default
	// 256 blocks); a file's window grows with the file up to MaxFileReserve.
	FileReserve    int64
	MaxFileReserve int64
	// JournalLimit, MaxPending: see the defaults.
	JournalLimit int64
	MaxPending   int
}

func (o Options) withDefaults() (Options, error) {
	if o.BlockSize == 0 {
		o.BlockSize = DefaultBlockSize
	}
	if o.BlockSize < 512 || o.BlockSize&(o.BlockSize-1) != 0 {
		return o, fmt.Errorf("cow: block size %d is not a power of two >= 512", o.BlockSize)
	}
	if o.Reserve == 0 {
		o.Reserve = DefaultReserve
	}
	if o.MaxSize > 0 && o.Reserve > o.MaxSize {
		o.Reserve = o.MaxSize
	}
	if o.GrowStep <= 0 {
		o.GrowStep = max(o.Reserve, 1<<20)
	}
	if o.PunchThreshold == 0 {
		o.PunchThreshold = DefaultPunchThreshold
	}
	if o.FileReserve <= 0 {
		o.FileReserve = 256 * int64(o.BlockSize)
	}
	if o.MaxFileReserve <= 0 {
		o.MaxFileReserve = 32 << 20
	}
	if o.JournalLimit <= 0 {
		o.JournalLimit = DefaultJournalLimit
	}
	if o.MaxPending <= 0 {
		o.MaxPending = DefaultMaxPending
	}
	return o, nil
}

var (
	// ErrNotExist: no file with that id in the region.
	ErrNotExist = errors.New("cow: file does not exist")
	// ErrExist: Create of an id that is already present.
	ErrExist = errors.New("cow: file already exists")
	// ErrRemoved: the File handle refers to a removed file.
	ErrRemoved = errors.New("cow: file was removed")
	// ErrClosed: the region is closed.
	ErrClosed = errors.New("cow: region closed")
	// ErrNoSpace wraps syscall.ENOSPC: the region is at its cap.
	ErrNoSpace = fmt.Errorf("cow: region full: %w", syscall.ENOSPC)
)

// errNeedCommit: the allocator has no space now but pending frees would
// give some once committed; callers drop their locks, Sync, and retry.
var errNeedCommit = errors.New("cow: need commit to release freed blocks")
