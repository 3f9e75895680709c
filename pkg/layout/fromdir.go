package layout

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/dupsnap/dupsnap/pkg/cas"
)

// FromDir turns an overlay-format upper/staging directory into a manifest:
// 0/0 character devices are whiteouts, directories with trusted.overlay.opaque
// or user.overlay.opaque = "y" are opaque. Contents go through b (the caller
// commits it). The tar is synthesised deterministically (names sorted, PAX
// records for xattrs and long names, mtimes in whole seconds, hardlinks by
// inode, no atime/ctime, no user/group names) so Export yields a valid
// layer whose sha256 is the manifest's DiffID.
func FromDir(ctx context.Context, b *cas.Batch, dir string) (*Manifest, error) {
	return fromDir(ctx, b, dir, DirOptions{})
}

// DirOptions change how FromDirWith reads a staging directory.
type DirOptions struct {
	// Adopt: the caller owns dir and deletes it once b is committed, so
	// regular files become objects through cas.Batch.AdoptFile (hashed in
	// place, linked, never copied). That changes their mode, owner, times
	// and xattrs after FromDirWith has read them: dir is spent afterwards.
	Adopt bool
	// SkipDir, if set, is asked about every directory below the root (rel
	// is slash separated); true omits the directory's own entry, its
	// contents are still read. For parent directories an applier created
	// implicitly, which the layer's tar did not contain.
	SkipDir func(rel string, st *unix.Stat_t, xattrs map[string]string) bool
}

// FromDirWith is FromDir with options.
func FromDirWith(ctx context.Context, b *cas.Batch, dir string, o DirOptions) (*Manifest, error) {
	return fromDir(ctx, b, dir, o)
}

// adopter is the part of *cas.Batch that DirOptions.Adopt needs.
type adopter interface {
	AdoptFile(ctx context.Context, f *os.File, tee io.Writer) (digest.Digest, int64, error)
}

// synthWriter receives the synthesised tar: everything is hashed (the
// diffID); outside payloads the bytes are also kept as raw segments.
type synthWriter struct {
	h       *asyncHash
	n       int64
	payload bool
	pending []byte
}

func (w *synthWriter) Write(p []byte) (int, error) {
	w.h.Write(p)
	w.n += int64(len(p))
	if !w.payload {
		w.pending = append(w.pending, p...)
	}
	return len(p), nil
}

// asyncHash hashes in a goroutine of its own what is written to it
// (buffered, in order): the diffID's sha256 then runs beside the content
// hashing of the CAS puts, on the other core, instead of after it.
type asyncHash struct {
	h    hash.Hash
	buf  []byte
	ch   chan []byte
	free chan []byte
	done chan struct{}
}

const asyncHashBuf = 256 << 10

func newAsyncHash() *asyncHash {
	a := &asyncHash{h: sha256.New(), ch: make(chan []byte, 3), free: make(chan []byte, 4), done: make(chan struct{})}
	for i := 0; i < 4; i++ {
		a.free <- make([]byte, 0, asyncHashBuf)
	}
	a.buf = <-a.free
	ch := a.ch // Close nils the field, maybe before this goroutine first runs
	go func() {
		defer close(a.done)
		for b := range ch {
			a.h.Write(b)
			a.free <- b[:0]
		}
	}()
	return a
}

func (a *asyncHash) Write(p []byte) {
	for len(p) > 0 {
		n := copy(a.buf[len(a.buf):cap(a.buf)], p)
		a.buf = a.buf[:len(a.buf)+n]
		p = p[n:]
		if len(a.buf) == cap(a.buf) {
			a.ch <- a.buf
			a.buf = <-a.free
		}
	}
}

// Sum flushes, waits for the hasher and returns the digest. Close must
// follow every newAsyncHash (Sum does it).
func (a *asyncHash) Sum() []byte {
	a.Close()
	return a.h.Sum(nil)
}

// Close stops the hasher (idempotent).
func (a *asyncHash) Close() {
	if a.ch == nil {
		return
	}
	if len(a.buf) > 0 {
		a.ch <- a.buf
	}
	close(a.ch)
	a.ch = nil
	<-a.done
}

type dirWalker struct {
	ctx   context.Context
	p     putter
	root  string
	sw    *synthWriter
	tw    *tar.Writer
	in    *ingester
	opts  DirOptions
	inode map[[2]uint64]*tar.Header // (dev, ino) of multiply-linked files -> first entry
}

func fromDir(ctx context.Context, p putter, dir string, o DirOptions) (*Manifest, error) {
	sw := &synthWriter{h: newAsyncHash()}
	defer sw.h.Close()
	w := &dirWalker{
		ctx:   ctx,
		p:     p,
		root:  dir,
		sw:    sw,
		tw:    tar.NewWriter(sw),
		opts:  o,
		inode: map[[2]uint64]*tar.Header{},
		in: &ingester{ctx: ctx, p: p, opts: IngestOptions{}.withDefaults(),
			links: symlinkGuard{}, m: &Manifest{}},
	}
	var st unix.Stat_t
	if err := unix.Lstat(dir, &st); err != nil {
		return nil, fmt.Errorf("layout: from dir: %w", err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return nil, fmt.Errorf("layout: from dir: %s is not a directory", dir)
	}
	// The root itself gets no entry (as containerd's diff writer), but an
	// opaque root still hides everything below.
	if opaque, err := isOpaque(dir); err != nil {
		return nil, err
	} else if opaque {
		if err := w.marker(whiteoutOpaque, &st); err != nil {
			return nil, err
		}
	}
	if err := w.walk(""); err != nil {
		return nil, err
	}
	sw.payload = false
	if err := w.tw.Close(); err != nil {
		return nil, err
	}
	m := w.in.m
	m.raw.tail = sw.pending
	m.DiffID = digest.NewDigestFromBytes(digest.SHA256, sw.h.Sum())
	m.Size = sw.n
	return m, nil
}

func (w *dirWalker) walk(rel string) error {
	if err := w.ctx.Err(); err != nil {
		return err
	}
	ents, err := os.ReadDir(filepath.Join(w.root, rel))
	if err != nil {
		return fmt.Errorf("layout: from dir: %w", err)
	}
	for _, de := range ents {
		name := de.Name()
		p := name
		if rel != "" {
			p = rel + "/" + name
		}
		if err := w.one(p); err != nil {
			return err
		}
	}
	return nil
}

func (w *dirWalker) one(p string) error {
	full := filepath.Join(w.root, p)
	var st unix.Stat_t
	if err := unix.Lstat(full, &st); err != nil {
		return fmt.Errorf("layout: from dir: %w", err)
	}
	hdr := &tar.Header{
		Name:    p,
		Mode:    int64(st.Mode & 07777),
		Uid:     int(st.Uid),
		Gid:     int(st.Gid),
		ModTime: time.Unix(st.Mtim.Sec, 0),
		Format:  tar.FormatPAX,
	}
	xattrs, err := listXattrs(full)
	if err != nil {
		return err
	}
	for k, v := range xattrs {
		if hdr.PAXRecords == nil {
			hdr.PAXRecords = map[string]string{}
		}
		hdr.PAXRecords["SCHILY.xattr."+k] = v
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFDIR:
		hdr.Typeflag = tar.TypeDir
		hdr.Name += "/"
		if w.opts.SkipDir != nil && w.opts.SkipDir(p, &st, xattrs) {
			return w.walk(p)
		}
		if err := w.header(hdr, full, nil); err != nil {
			return err
		}
		if opaque, err := isOpaque(full); err != nil {
			return err
		} else if opaque {
			if err := w.marker(p+"/"+whiteoutOpaque, &st); err != nil {
				return err
			}
		}
		return w.walk(p)
	case unix.S_IFREG:
		if st.Nlink > 1 {
			key := [2]uint64{uint64(st.Dev), st.Ino}
			if first, ok := w.inode[key]; ok {
				// The inode's metadata as read for the first name: an
				// adopted inode has an object's by now.
				hdr.Typeflag = tar.TypeLink
				hdr.Linkname = first.Name
				hdr.Mode, hdr.Uid, hdr.Gid, hdr.ModTime, hdr.PAXRecords = first.Mode, first.Uid, first.Gid, first.ModTime, first.PAXRecords
				return w.header(hdr, full, nil)
			}
			w.inode[key] = hdr
		}
		hdr.Typeflag = tar.TypeReg
		hdr.Size = st.Size
		return w.header(hdr, full, &st)
	case unix.S_IFLNK:
		target, err := os.Readlink(full)
		if err != nil {
			return fmt.Errorf("layout: from dir: %w", err)
		}
		hdr.Typeflag = tar.TypeSymlink
		hdr.Linkname = target
		return w.header(hdr, full, nil)
	case unix.S_IFCHR:
		if st.Rdev == 0 {
			// overlay whiteout
			return w.marker(filepath.Join(filepath.Dir(p), whiteoutPrefix+filepath.Base(p)), &st)
		}
		hdr.Typeflag = tar.TypeChar
	case unix.S_IFBLK:
		hdr.Typeflag = tar.TypeBlock
	case unix.S_IFIFO:
		hdr.Typeflag = tar.TypeFifo
	case unix.S_IFSOCK:
		return nil // tar cannot carry sockets; containerd skips them too
	default:
		return fmt.Errorf("layout: from dir: %s: unsupported file type %o", p, st.Mode&unix.S_IFMT)
	}
	hdr.Devmajor = int64(unix.Major(uint64(st.Rdev)))
	hdr.Devminor = int64(unix.Minor(uint64(st.Rdev)))
	return w.header(hdr, full, nil)
}

// marker writes a whiteout or opaque marker: an empty regular file.
func (w *dirWalker) marker(name string, st *unix.Stat_t) error {
	hdr := &tar.Header{
		Typeflag: tar.TypeReg,
		Name:     filepath.ToSlash(name),
		ModTime:  time.Unix(st.Mtim.Sec, 0),
		Format:   tar.FormatPAX,
	}
	return w.header(hdr, "", nil)
}

// header writes one entry (and its content when st is given).
func (w *dirWalker) header(hdr *tar.Header, full string, st *unix.Stat_t) error {
	e, err := w.in.convert(hdr)
	if err != nil {
		return fmt.Errorf("layout: from dir: %w", err)
	}
	w.sw.payload = false
	if err := w.tw.WriteHeader(hdr); err != nil {
		return fmt.Errorf("layout: from dir: %s: %w", hdr.Name, err)
	}
	seg := rawSeg{hdr: w.sw.pending}
	w.sw.pending = make([]byte, 0, 1024)
	if e.Type == TypeFile {
		if e.Size == 0 {
			e.Digest = emptyDigest
			if !w.in.emptyDone {
				if _, _, err := w.p.Put(w.ctx, bytes.NewReader(nil)); err != nil {
					return err
				}
				w.in.emptyDone = true
			}
		} else {
			f, err := os.Open(full)
			if err != nil {
				return fmt.Errorf("layout: from dir: %w", err)
			}
			w.sw.payload = true
			var (
				d digest.Digest
				n int64
			)
			if a, ok := w.p.(adopter); ok && w.opts.Adopt {
				d, n, err = a.AdoptFile(w.ctx, f, w.tw)
			} else {
				d, n, err = w.p.Put(w.ctx, io.TeeReader(f, w.tw))
			}
			w.sw.payload = false
			f.Close()
			if err != nil {
				return fmt.Errorf("layout: from dir: %s: %w", hdr.Name, err)
			}
			if n != e.Size {
				return fmt.Errorf("layout: from dir: %s changed size while read (%d, was %d)", hdr.Name, n, e.Size)
			}
			e.Digest = d
			seg.paySize = n
		}
	}
	w.in.m.Entries = append(w.in.m.Entries, e)
	w.in.m.raw.segs = append(w.in.m.raw.segs, seg)
	return nil
}

// listXattrs returns the xattrs a layer carries: overlay's own
// (trusted.overlay.*, user.overlay.*) are not file metadata and are dropped;
// metacopy and redirect files cannot be turned into a tar and are refused.
func listXattrs(p string) (map[string]string, error) {
	names, err := llistxattr(p)
	if err != nil {
		return nil, fmt.Errorf("layout: from dir: %s: %w", p, err)
	}
	var out map[string]string
	for _, n := range names {
		if strings.HasPrefix(n, "trusted.overlay.") || strings.HasPrefix(n, "user.overlay.") {
			switch strings.TrimPrefix(strings.TrimPrefix(n, "trusted.overlay."), "user.overlay.") {
			case "metacopy", "redirect":
				return nil, fmt.Errorf("layout: from dir: %s has overlay %s (unsupported in a layer)", p, n)
			}
			continue
		}
		v, err := lgetxattr(p, n)
		if err != nil {
			if errors.Is(err, unix.ENODATA) {
				continue
			}
			return nil, fmt.Errorf("layout: from dir: %s: %w", p, err)
		}
		if out == nil {
			out = map[string]string{}
		}
		out[n] = string(v)
	}
	return out, nil
}

func isOpaque(p string) (bool, error) {
	for _, n := range []string{"trusted.overlay.opaque", "user.overlay.opaque"} {
		v, err := lgetxattr(p, n)
		if err == nil && string(v) == "y" {
			return true, nil
		}
		if err != nil && !errors.Is(err, unix.ENODATA) && !errors.Is(err, unix.ENOTSUP) {
			return false, fmt.Errorf("layout: from dir: %s: %w", p, err)
		}
	}
	return false, nil
}

func llistxattr(p string) ([]string, error) {
	buf := make([]byte, 1024)
	for {
		n, err := unix.Llistxattr(p, buf)
		if errors.Is(err, unix.ERANGE) {
			buf = make([]byte, len(buf)*4)
			continue
		}
		if errors.Is(err, unix.ENOTSUP) {
			return nil, nil
		}
		if err != nil {
			return nil, err
		}
		var names []string
		for _, s := range strings.Split(string(buf[:n]), "\x00") {
			if s != "" {
				names = append(names, s)
			}
		}
		return names, nil
	}
}

func lgetxattr(p, name string) ([]byte, error) {
	buf := make([]byte, 256)
	for {
		n, err := unix.Lgetxattr(p, name, buf)
		if errors.Is(err, unix.ERANGE) {
			sz, err2 := unix.Lgetxattr(p, name, nil)
			if err2 != nil {
				return nil, err2
			}
			buf = make([]byte, sz+16)
			continue
		}
		if err != nil {
			return nil, err
		}
		return buf[:n], nil
	}
}
