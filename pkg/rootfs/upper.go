package rootfs

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/dupsnap/dupsnap/pkg/cas"
	"github.com/dupsnap/dupsnap/pkg/layout"
)

// writeLayer holds the content of the files an active snapshot modified or
// created. The namespace (dirs, names, whiteouts, metadata) is the
// overlay-format upper dir; only file data goes through this interface so
// that pkg/cow's block-granular region can replace whole-file copy-up
// without touching the node code.
type writeLayer interface {
	// CopyUpData gives dst, a new empty upper file, the content of image
	// file e (the overlay layer copies it whole; a block CoW layer records
	// e.Digest as the base and copies nothing).
	CopyUpData(ctx context.Context, dst *os.File, e *layout.Entry) error
	// Open opens the content of the upper file at path for reading and
	// writing (the handle serves every open of that inode).
	Open(path string) (dataFile, error)
}

// dataFile is the open content of a modified or new file.
type dataFile interface {
	io.ReaderAt
	io.WriterAt
	Truncate(size int64) error
	Sync() error
	Close() error
	Stat() (os.FileInfo, error)
	// Fd is a descriptor the kernel may use for passthrough, or -1.
	Fd() uintptr
}

// overlayData is the whole-file copy-up write layer: upper files hold
// their full content.
type overlayData struct{ cas *cas.Store }

func (o overlayData) CopyUpData(ctx context.Context, dst *os.File, e *layout.Entry) error {
	if e.Size == 0 {
		return nil
	}
	src, err := o.cas.OpenFile(e.Digest)
	if err != nil {
		return fmt.Errorf("open object %s: %w", e.Digest, err)
	}
	defer src.Close()
	// io.Copy between two *os.File uses copy_file_range (reflink-able).
	if _, err := io.Copy(dst, src); err != nil {
		return fmt.Errorf("copy object %s: %w", e.Digest, err)
	}
	return nil
}

func (o overlayData) Open(path string) (dataFile, error) {
	// Always read-write: go-fuse registers the first open's fd as the
	// passthrough backing file of the inode and reuses it for later opens.
	return os.OpenFile(path, os.O_RDWR, 0)
}

// tmpName is a fresh name in the work dir.
func (r *rootFS) tmpName() string {
	return filepath.Join(r.work, "tmp"+strconv.FormatUint(atomic.AddUint64(&r.tmpSeq, 1), 10))
}

// setMeta applies an image entry's metadata to an upper entry. Order
// matters: chown clears setuid bits and security.capability, so it comes
// first; times come last.
func setMeta(p string, e *layout.Entry) error {
	if err := os.Lchown(p, e.UID, e.GID); err != nil {
		return err
	}
	if e.Type != layout.TypeSymlink {
		if err := syscall.Chmod(p, e.Mode&07777); err != nil {
			return err
		}
	}
	for k, v := range e.Xattrs {
		if err := unix.Lsetxattr(p, k, []byte(v), 0); err != nil {
			return fmt.Errorf("set xattr %s: %w", k, err)
		}
	}
	if !e.ModTime.IsZero() {
		ts, _ := unix.TimeToTimespec(e.ModTime)
		if err := unix.UtimesNanoAt(unix.AT_FDCWD, p, []unix.Timespec{ts, ts}, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return err
		}
	}
	return nil
}

// createFrom makes tmp a copy of image entry e (no hardlink handling).
func (r *rootFS) createFrom(ctx context.Context, tmp string, e *layout.Entry) error {
	switch e.Type {
	case layout.TypeDir:
		if err := os.Mkdir(tmp, 0o700); err != nil {
			return err
		}
	case layout.TypeSymlink:
		if err := os.Symlink(e.Linkname, tmp); err != nil {
			return err
		}
	case layout.TypeChar, layout.TypeBlock, layout.TypeFifo:
		dev := int(unix.Mkdev(e.Devmajor, e.Devminor))
		if err := unix.Mknod(tmp, typeBits(e.Type)|0o600, dev); err != nil {
			return err
		}
	default:
		f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return err
		}
		err = r.data.CopyUpData(ctx, f, e)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			os.Remove(tmp)
			return err
		}
	}
	if err := setMeta(tmp, e); err != nil {
		os.RemoveAll(tmp)
		return fmt.Errorf("copy-up metadata of %s: %w", e.Path, err)
	}
	return nil
}

// ensureUpperDir makes sure every component of dir p exists in the upper
// dir, copying image dirs up with their metadata. Every missing component
// is an image dir at the same path: anything moved or created already is
// in upper. Caller holds r.mu.
func (r *rootFS) ensureUpperDir(ctx context.Context, p string) error {
	if _, err := os.Lstat(r.upperPath(p)); err == nil {
		return nil
	}
	if p == "" {
		return fmt.Errorf("upper dir %s missing", r.upper)
	}
	if err := r.ensureUpperDir(ctx, dirOf(p)); err != nil {
		return err
	}
	ln := r.tree.Lookup(p)
	if ln == nil || ln.Entry.Type != layout.TypeDir {
		return fmt.Errorf("copy-up of dir %q: no image dir there: %w", p, syscall.ENOENT)
	}
	tmp := r.tmpName()
	e := ln.Entry
	if e.Mode == 0 && e.UID == 0 && e.ModTime.IsZero() {
		e.Mode = 0o755 // dir implied by a deeper entry, with no header
	}
	if err := r.createFrom(ctx, tmp, &e); err != nil {
		return err
	}
	if err := os.Rename(tmp, r.upperPath(p)); err != nil {
		os.RemoveAll(tmp)
		return fmt.Errorf("copy-up of dir %q: %w", p, err)
	}
	return nil
}

// copyUp gives the image inode ln, visible at path p, an upper copy, and
// links that copy to the other visible names of ln. Caller holds r.mu.
func (r *rootFS) copyUp(ctx context.Context, p string, ln *layout.Node) error {
	if err := r.ensureUpperDir(ctx, dirOf(p)); err != nil {
		return err
	}
	tmp := r.tmpName()
	if err := r.createFrom(ctx, tmp, &ln.Entry); err != nil {
		return fmt.Errorf("copy-up of %q: %w", p, err)
	}
	var st syscall.Stat_t
	if err := syscall.Lstat(tmp, &st); err != nil {
		return err
	}
	if err := os.Rename(tmp, r.upperPath(p)); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("copy-up of %q: %w", p, err)
	}
	r.copyup[st.Ino] = ln.Ino
	if ln.Nlink > 1 {
		for _, q := range r.links[ln] {
			if q == p {
				continue
			}
			es, errno := r.resolve(q)
			if errno != 0 || es.up || es.lower != ln {
				continue
			}
			if err := r.ensureUpperDir(ctx, dirOf(q)); err != nil {
				return err
			}
			if err := os.Link(r.upperPath(p), r.upperPath(q)); err != nil {
				return fmt.Errorf("copy-up of hardlink %q: %w", q, err)
			}
		}
	}
	return nil
}

// materialize copies the whole image part of the merged dir at p (lower
// ln) into its upper dir and makes it opaque, so the dir no longer depends
// on its path in the image and can be renamed. Caller holds r.mu.
func (r *rootFS) materialize(ctx context.Context, p string, ln *layout.Node, seen map[*layout.Node]string) error {
	if err := r.ensureUpperDir(ctx, p); err != nil {
		return err
	}
	up := r.upperPath(p)
	if isOpaque(up) {
		return nil
	}
	for _, name := range r.sortedNames(ln) {
		c := ln.Children[name]
		q := join(p, name)
		var st syscall.Stat_t
		if err := syscall.Lstat(r.upperPath(q), &st); err == nil {
			if isWhiteout(&st) {
				if err := os.Remove(r.upperPath(q)); err != nil {
					return err
				}
			} else if st.Mode&syscall.S_IFMT == syscall.S_IFDIR && c.Entry.Type == layout.TypeDir {
				if err := r.materialize(ctx, q, c, seen); err != nil {
					return err
				}
			}
			continue
		}
		if c.Entry.Type == layout.TypeDir {
			if err := r.materialize(ctx, q, c, seen); err != nil {
				return err
			}
			continue
		}
		if first, ok := seen[c]; ok && c.Nlink > 1 {
			if err := os.Link(r.upperPath(first), r.upperPath(q)); err != nil {
				return err
			}
			continue
		}
		tmp := r.tmpName()
		if err := r.createFrom(ctx, tmp, &c.Entry); err != nil {
			return err
		}
		if err := syscall.Lstat(tmp, &st); err == nil {
			r.copyup[st.Ino] = c.Ino
		}
		if err := os.Rename(tmp, r.upperPath(q)); err != nil {
			os.Remove(tmp)
			return err
		}
		seen[c] = q
	}
	var st syscall.Stat_t
	if err := syscall.Lstat(up, &st); err == nil {
		r.copyup[st.Ino] = ln.Ino
	}
	return setOpaque(up)
}

func setOpaque(p string) error {
	if err := unix.Lsetxattr(p, opaqueXattr, []byte("y"), 0); err != nil {
		return fmt.Errorf("mark %s opaque: %w", p, err)
	}
	return nil
}

// whiteout hides the image entry at p. Caller holds r.mu.
func (r *rootFS) whiteout(ctx context.Context, p string) error {
	if err := r.ensureUpperDir(ctx, dirOf(p)); err != nil {
		return err
	}
	if err := unix.Mknod(r.upperPath(p), syscall.S_IFCHR|0o600, 0); err != nil {
		return fmt.Errorf("whiteout %q: %w", p, err)
	}
	return nil
}

// removeWhiteout clears a whiteout at p; reports whether there was one.
func (r *rootFS) removeWhiteout(p string) (bool, error) {
	var st syscall.Stat_t
	if err := syscall.Lstat(r.upperPath(p), &st); err != nil || !isWhiteout(&st) {
		return false, nil
	}
	return true, os.Remove(r.upperPath(p))
}

func dirOf(p string) string {
	i := strings.LastIndexByte(p, '/')
	if i < 0 {
		return ""
	}
	return p[:i]
}
