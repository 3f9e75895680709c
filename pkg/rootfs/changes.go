package rootfs

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/dupsnap/dupsnap/pkg/cas"
	"github.com/dupsnap/dupsnap/pkg/cow"
	"github.com/dupsnap/dupsnap/pkg/layout"
)

// Changes returns a manifest of the modifications of an active snapshot
// relative to its layers. The upper dir is in overlay format (whiteouts,
// opaque dirs, metadata); the data of modified image files and new files
// is in the region, so Changes writes the layer's tar itself (upper
// metadata + merged region bytes) and ingests it: modified image files
// become new CAS objects of their merged content. It works whether or not
// the rootfs is mounted; a live server is asked to commit its region first
// (fsync of the mount root). For a consistent result the container should
// not be writing.
func Changes(ctx context.Context, cfg Config, b *cas.Batch) (*layout.Manifest, error) {
	up := cfg.upperDir()
	if up == "" {
		return nil, fmt.Errorf("rootfs: changes of %s: not an active snapshot", cfg.Mountpoint)
	}
	if err := os.MkdirAll(up, 0o755); err != nil {
		return nil, fmt.Errorf("rootfs: changes: %w", err)
	}
	reg, err := readRegion(cfg)
	if err != nil {
		return nil, err
	}
	var store *cas.Store
	if reg != nil {
		defer reg.Close()
		if store, err = cas.Open(cfg.CASRoot, cas.Options{}); err != nil {
			return nil, fmt.Errorf("rootfs: changes: open cas: %w", err)
		}
		defer store.Close()
	}
	pr, pw := io.Pipe()
	go func() {
		tw := &tarWalker{ctx: ctx, root: up, reg: reg, cas: store, tw: tar.NewWriter(pw), inodes: map[uint64]string{}}
		err := tw.walk("")
		if err == nil {
			err = tw.tw.Close()
		}
		pw.CloseWithError(err)
	}()
	m, err := layout.Ingest(ctx, b, pr, layout.IngestOptions{})
	pr.CloseWithError(errors.New("rootfs: changes: reader gone"))
	if err != nil {
		return nil, fmt.Errorf("rootfs: changes of %s: %w", cfg.StateDir, err)
	}
	return m, nil
}

// readRegion opens the durable state of the snapshot's region (nil if it
// has none), after asking a live server to commit it.
func readRegion(cfg Config) (*cow.Region, error) {
	if _, err := os.Stat(filepath.Join(cfg.regionDir(), "journal")); err != nil {
		return nil, nil
	}
	if Alive(cfg.Mountpoint) {
		// fsyncdir of the root makes the server Sync the region. Never
		// called from the server itself (that would deadlock on its mount).
		if f, err := os.Open(cfg.Mountpoint); err == nil {
			err = f.Sync()
			f.Close()
			if err != nil {
				return nil, fmt.Errorf("rootfs: sync region of %s: %w", cfg.Mountpoint, err)
			}
		}
	}
	reg, err := cow.OpenReadOnly(cfg.regionDir())
	if err != nil {
		return nil, fmt.Errorf("rootfs: read region of %s: %w", cfg.StateDir, err)
	}
	return reg, nil
}

// tarWalker writes the upper dir as a layer tar, in the order and format
// of layout.FromDir (sorted names, PAX, whole-second mtimes, hardlinks by
// inode, whiteout and opaque markers).
type tarWalker struct {
	ctx    context.Context
	root   string
	reg    *cow.Region
	cas    *cas.Store
	tw     *tar.Writer
	inodes map[uint64]string
}

func (w *tarWalker) walk(rel string) error {
	if err := w.ctx.Err(); err != nil {
		return err
	}
	ents, err := os.ReadDir(filepath.Join(w.root, rel))
	if err != nil {
		return err
	}
	for _, de := range ents {
		p := de.Name()
		if rel != "" {
			p = rel + "/" + p
		}
		if err := w.one(p); err != nil {
			return err
		}
	}
	return nil
}

func (w *tarWalker) marker(name string, st *unix.Stat_t) error {
	return w.tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name,
		ModTime: time.Unix(st.Mtim.Sec, 0), Format: tar.FormatPAX})
}

func (w *tarWalker) one(p string) error {
	full := filepath.Join(w.root, p)
	var st unix.Stat_t
	if err := unix.Lstat(full, &st); err != nil {
		return err
	}
	hdr := &tar.Header{Name: p, Mode: int64(st.Mode & 07777), Uid: int(st.Uid), Gid: int(st.Gid),
		ModTime: time.Unix(st.Mtim.Sec, 0), Format: tar.FormatPAX}
	if x := layerXattrs(full); len(x) > 0 {
		hdr.PAXRecords = map[string]string{}
		for k, v := range x {
			hdr.PAXRecords["SCHILY.xattr."+k] = v
		}
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFDIR:
		hdr.Typeflag, hdr.Name = tar.TypeDir, p+"/"
		if err := w.tw.WriteHeader(hdr); err != nil {
			return err
		}
		if isOpaque(full) {
			if err := w.marker(p+"/.wh..wh..opq", &st); err != nil {
				return err
			}
		}
		return w.walk(p)
	case unix.S_IFREG:
		if st.Nlink > 1 {
			if first, ok := w.inodes[st.Ino]; ok {
				hdr.Typeflag, hdr.Linkname = tar.TypeLink, first
				return w.tw.WriteHeader(hdr)
			}
			w.inodes[st.Ino] = p
		}
		hdr.Typeflag = tar.TypeReg
		return w.file(hdr, full, st.Size)
	case unix.S_IFLNK:
		t, err := os.Readlink(full)
		if err != nil {
			return err
		}
		hdr.Typeflag, hdr.Linkname = tar.TypeSymlink, t
	case unix.S_IFCHR:
		if st.Rdev == 0 {
			return w.marker(filepath.Join(filepath.Dir(p), ".wh."+filepath.Base(p)), &st)
		}
		hdr.Typeflag = tar.TypeChar
	case unix.S_IFBLK:
		hdr.Typeflag = tar.TypeBlock
	case unix.S_IFIFO:
		hdr.Typeflag = tar.TypeFifo
	default:
		return nil // sockets: tar cannot carry them
	}
	hdr.Devmajor = int64(unix.Major(uint64(st.Rdev)))
	hdr.Devminor = int64(unix.Minor(uint64(st.Rdev)))
	return w.tw.WriteHeader(hdr)
}

// file writes a regular file: plain upper content, or the merged bytes of
// its region file over its base object.
func (w *tarWalker) file(hdr *tar.Header, full string, size int64) error {
	var src io.Reader
	ref, isCow := readCowRef(full)
	if isCow && w.reg != nil {
		var base *os.File
		if ref.base != "" && ref.baseSize > 0 {
			var err error
			if base, err = w.cas.OpenFile(ref.base); err != nil {
				return fmt.Errorf("base of %s: %w", hdr.Name, err)
			}
			defer base.Close()
		}
		f, err := w.reg.File(ref.id)
		switch {
		case err == nil:
			size, src = f.Size(), f.NewReader(base)
		case errors.Is(err, cow.ErrNotExist) && base != nil:
			size, src = ref.baseSize, base // never written since copy-up
		case errors.Is(err, cow.ErrNotExist):
			size, src = 0, strings.NewReader("")
		default:
			return err
		}
	} else {
		f, err := os.Open(full)
		if err != nil {
			return err
		}
		defer f.Close()
		src = f
	}
	hdr.Size = size
	if err := w.tw.WriteHeader(hdr); err != nil {
		return err
	}
	n, err := io.Copy(w.tw, io.LimitReader(src, size))
	if err == nil && n != size {
		err = fmt.Errorf("%s: short content (%d of %d bytes)", hdr.Name, n, size)
	}
	return err
}

// layerXattrs are the xattrs a layer carries (not overlay's or ours).
func layerXattrs(p string) map[string]string {
	buf := make([]byte, 64<<10)
	n, err := unix.Llistxattr(p, buf)
	if err != nil || n <= 0 {
		return nil
	}
	out := map[string]string{}
	for _, k := range strings.Split(string(buf[:n]), "\x00") {
		if k == "" || internalXattr(k) || strings.HasPrefix(k, "user.overlay.") {
			continue
		}
		v := make([]byte, 64<<10)
		m, err := unix.Lgetxattr(p, k, v)
		if err == nil {
			out[k] = string(v[:m])
		}
	}
	return out
}

// Usage returns bytes and inodes used by the writable state: the region's
// mapped bytes (as of its last commit; a live server commits every
// syncInterval) and its file count. No walk of the container's files.
func Usage(cfg Config) (bytes int64, inodes int64, err error) {
	if cfg.StateDir == "" {
		return 0, 0, nil
	}
	if _, err := os.Stat(filepath.Join(cfg.regionDir(), "journal")); err != nil {
		return 0, 0, nil
	}
	reg, err := cow.OpenReadOnly(cfg.regionDir())
	if err != nil {
		return 0, 0, fmt.Errorf("rootfs: usage of %s: %w", cfg.StateDir, err)
	}
	defer reg.Close()
	return reg.Usage(), int64(len(reg.Files())), nil
}

var _ = syscall.ENOENT
