package cas

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

// AdoptFile makes the content of f, an open regular file on the store's
// filesystem that the caller owns, an object without copying it: the inode
// gets a hard link in tmp/ (a named temp like any other), is made 0444
// root:root without xattrs and with mtime now, and is hashed (each byte is
// also written to tee if it is not nil). At Commit it is renamed into place
// like a written temp, or dropped if the object exists; Abort unlinks it.
//
// Adopting changes the inode's metadata, so the caller must read what it
// needs (mode, owner, times, xattrs) first, must not write the file from
// now on, and should unlink its own name after Commit. Durability is the
// batch's: Commit syncs data before names exist. Where adopting is not
// possible (compressing store, another filesystem) the content is copied
// with Put instead.
func (b *Batch) AdoptFile(ctx context.Context, f *os.File, tee io.Writer) (digest.Digest, int64, error) {
	if b.s.opts.Compress {
		return b.putCopy(ctx, f, tee)
	}
	b.mu.Lock()
	if b.done {
		b.mu.Unlock()
		return "", 0, errors.New("cas: adopt on a finished batch")
	}
	if b.werr != nil {
		err := b.werr
		b.mu.Unlock()
		return "", 0, err
	}
	if err := b.start(ctx); err != nil {
		b.mu.Unlock()
		return "", 0, err
	}
	b.inflight.Add(1)
	b.mu.Unlock()
	// inflight keeps Commit/Abort (drain) from starting while this runs.
	defer b.inflight.Done()
	if err := ctx.Err(); err != nil {
		return "", 0, err
	}

	fd := int(f.Fd())
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return "", 0, fmt.Errorf("cas: adopt: %w", err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return "", 0, fmt.Errorf("cas: adopt %s: not a regular file", f.Name())
	}
	// Hash first: content the store or the batch has already (a layer
	// repeating files of another) costs no link and no metadata change.
	d, n, err := hashTee(f, tee)
	if err != nil {
		return "", 0, fmt.Errorf("cas: adopt %s: read: %w", f.Name(), err)
	}
	if b.present(d) {
		return d, n, nil
	}
	t := &tempObj{name: b.s.newTempName(), hex: d.Encoded(), fd: -1}
	b.mu.Lock()
	if _, ok := b.pending[d]; ok {
		b.mu.Unlock()
		return d, n, nil
	}
	b.pending[d] = t // claimed: a concurrent adopt of the same content drops its file
	b.mu.Unlock()
	// The temp name pins the inode; the object gets its name at Commit.
	if err := b.s.linkFd(fd, t.name); err != nil {
		b.mu.Lock()
		delete(b.pending, d)
		b.mu.Unlock()
		if errors.Is(err, unix.EXDEV) || errors.Is(err, unix.EMLINK) || errors.Is(err, unix.EPERM) {
			// Not linkable (another filesystem): copy, verified against d.
			// The tee has had the bytes already.
			return d, n, b.putCopyExpected(ctx, f, d)
		}
		return "", 0, fmt.Errorf("cas: adopt %s: %w", f.Name(), err)
	}
	b.mu.Lock()
	b.linked = append(b.linked, t)
	b.mu.Unlock()
	if err := normalize(fd, &st); err != nil {
		return "", 0, fmt.Errorf("cas: adopt %s: %w", f.Name(), err)
	}
	b.mu.Lock()
	b.order = append(b.order, t)
	b.mu.Unlock()
	return d, n, nil
}

func (b *Batch) putCopyExpected(ctx context.Context, f *os.File, d digest.Digest) error {
	_, err := b.PutExpected(ctx, d, io.NewSectionReader(f, 0, 1<<62))
	return err
}

func (b *Batch) putCopy(ctx context.Context, f *os.File, tee io.Writer) (digest.Digest, int64, error) {
	var r io.Reader = io.NewSectionReader(f, 0, 1<<62)
	if tee != nil {
		r = io.TeeReader(r, tee)
	}
	return b.Put(ctx, r)
}

// linkFd gives the inode open at fd the name tmp/<name>.
func (s *Store) linkFd(fd int, name string) error {
	err := unix.Linkat(fd, "", s.tmpFd, name, unix.AT_EMPTY_PATH)
	if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EPERM) {
		// AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH; /proc does not.
		err = unix.Linkat(unix.AT_FDCWD, "/proc/self/fd/"+strconv.Itoa(fd), s.tmpFd, name, unix.AT_SYMLINK_FOLLOW)
	}
	return err
}

// normalize gives an adopted inode an object's metadata: read-only, owned
// by root (as the objects a put writes), no xattrs (ACLs or capabilities
// of the original file mean nothing for an object), mtime now (GC's grace
// is counted from it, as for a freshly written object).
func normalize(fd int, st *unix.Stat_t) error {
	if st.Uid != 0 || st.Gid != 0 {
		if err := unix.Fchown(fd, 0, 0); err != nil && !errors.Is(err, unix.EPERM) {
			return fmt.Errorf("chown: %w", err)
		}
	}
	if err := unix.Fchmod(fd, objectMode); err != nil {
		return fmt.Errorf("chmod: %w", err)
	}
	buf := make([]byte, 1024)
	n, err := unix.Flistxattr(fd, buf)
	if errors.Is(err, unix.ERANGE) {
		if sz, err2 := unix.Flistxattr(fd, nil); err2 == nil {
			buf = make([]byte, sz)
			n, err = unix.Flistxattr(fd, buf)
		}
	}
	if err != nil && !errors.Is(err, unix.ENOTSUP) {
		return fmt.Errorf("list xattrs: %w", err)
	}
	for _, name := range strings.Split(string(buf[:max(n, 0)]), "\x00") {
		if name == "" {
			continue
		}
		if err := unix.Fremovexattr(fd, name); err != nil && !errors.Is(err, unix.ENODATA) {
			return fmt.Errorf("remove xattr %s: %w", name, err)
		}
	}
	now := unix.NsecToTimeval(time.Now().UnixNano())
	if err := unix.Futimes(fd, []unix.Timeval{now, now}); err != nil {
		return fmt.Errorf("utimens: %w", err)
	}
	return nil
}

// parallelHashMin: below this a chunk is hashed and teed in the caller's
// goroutine (a goroutine hand-off costs about as much as hashing ~8 KiB).
const parallelHashMin = 64 << 10

// hashTee hashes f and copies it to tee. The caller's tee typically hashes
// too (a synthesised tar's digest), so for all but small files the two
// run in parallel, chunk by chunk: a second core halves the latency.
func hashTee(f *os.File, tee io.Writer) (digest.Digest, int64, error) {
	h := sha256.New()
	pb := getBuf()
	defer putBuf(pb)
	r := io.NewSectionReader(f, 0, 1<<62)
	var total int64
	for {
		n, rerr := io.ReadFull(r, *pb)
		if n > 0 {
			chunk := (*pb)[:n]
			total += int64(n)
			if tee == nil {
				h.Write(chunk)
			} else if n < parallelHashMin {
				h.Write(chunk) // small: not worth a goroutine
				if _, err := tee.Write(chunk); err != nil {
					return "", 0, err
				}
			} else {
				done := make(chan struct{})
				go func() { h.Write(chunk); close(done) }()
				_, err := tee.Write(chunk)
				<-done
				if err != nil {
					return "", 0, err
				}
			}
		}
		if rerr == io.EOF || rerr == io.ErrUnexpectedEOF {
			break
		}
		if rerr != nil {
			return "", 0, rerr
		}
	}
	return digest.NewDigestFromBytes(digest.SHA256, h.Sum(nil)), total, nil
}
