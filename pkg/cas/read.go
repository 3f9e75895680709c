package cas

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

// names returns the object's candidate names relative to objects/sha256,
// the store's own format first (a store may hold both: Compress toggled).
func (s *Store) names(h string) [2]string {
	plain := relName(h)
	if s.opts.Compress {
		return [2]string{plain + zstSuffix, plain}
	}
	return [2]string{plain, plain + zstSuffix}
}

// locate finds an object's file: its relative name and stat.
func (s *Store) locate(d digest.Digest) (string, unix.Stat_t, error) {
	var st unix.Stat_t
	h, err := hexOf(d)
	if err != nil {
		return "", st, err
	}
	for _, name := range s.names(h) {
		err := unix.Fstatat(s.objFd, name, &st, unix.AT_SYMLINK_NOFOLLOW)
		if err == nil {
			return name, st, nil
		}
		if !errors.Is(err, unix.ENOENT) {
			return "", st, fmt.Errorf("cas: stat %s: %w", d, err)
		}
	}
	return "", st, fmt.Errorf("%w: %s", ErrNotFound, d)
}

// Has reports whether the object is stored.
func (s *Store) Has(d digest.Digest) bool {
	_, _, err := s.locate(d)
	return err == nil
}

// Stat describes a stored object; ErrNotFound if absent.
func (s *Store) Stat(d digest.Digest) (Info, error) {
	name, st, err := s.locate(d)
	if err != nil {
		return Info{}, err
	}
	return s.info(d, name, &st)
}

func (s *Store) info(d digest.Digest, name string, st *unix.Stat_t) (Info, error) {
	in := Info{
		Digest:  d,
		Size:    st.Size,
		Stored:  st.Size,
		ModTime: time.Unix(st.Mtim.Unix()),
	}
	if strings.HasSuffix(name, zstSuffix) {
		in.Compressed = true
		fd, err := unix.Openat(s.objFd, name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return Info{}, fmt.Errorf("cas: open %s: %w", d, err)
		}
		defer unix.Close(fd)
		if in.Size, err = readZSize(fd); err != nil {
			return Info{}, fmt.Errorf("%s: %w", d, err)
		}
	}
	return in, nil
}

func (s *Store) openName(d digest.Digest) (*os.File, string, error) {
	h, err := hexOf(d)
	if err != nil {
		return nil, "", err
	}
	for _, name := range s.names(h) {
		f, err := os.OpenFile(filepath.Join(s.root, objectsDir, name), os.O_RDONLY, 0)
		if err == nil {
			return f, name, nil
		}
		if !errors.Is(err, os.ErrNotExist) {
			return nil, "", fmt.Errorf("cas: open %s: %w", d, err)
		}
	}
	return nil, "", fmt.Errorf("%w: %s", ErrNotFound, d)
}

// Open returns the object's content, decompressing if stored compressed.
// It does not verify the digest (callers that restore content do).
func (s *Store) Open(d digest.Digest) (io.ReadCloser, error) {
	f, name, err := s.openName(d)
	if err != nil {
		return nil, err
	}
	if !strings.HasSuffix(name, zstSuffix) {
		return f, nil
	}
	z, err := newZstdFile(f)
	if err != nil {
		f.Close()
		return nil, err
	}
	return z, nil
}

// OpenFile returns the read-only file of an uncompressed object (for FUSE
// passthrough and ReadAt). Compressed objects are an error.
func (s *Store) OpenFile(d digest.Digest) (*os.File, error) {
	f, name, err := s.openName(d)
	if err != nil {
		return nil, err
	}
	if strings.HasSuffix(name, zstSuffix) {
		f.Close()
		return nil, fmt.Errorf("cas: object %s is stored compressed: no plain file", d)
	}
	return f, nil
}

// Walk calls fn for every stored object, shard by shard. Files that are
// not objects (bad names) are skipped. An error from fn stops the walk.
func (s *Store) Walk(ctx context.Context, fn func(Info) error) error {
	return s.walkNames(ctx, func(d digest.Digest, name string) error {
		var st unix.Stat_t
		if err := unix.Fstatat(s.objFd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			if errors.Is(err, unix.ENOENT) {
				return nil // deleted meanwhile
			}
			return fmt.Errorf("cas: stat %s: %w", name, err)
		}
		if st.Mode&unix.S_IFMT != unix.S_IFREG {
			return nil
		}
		in, err := s.info(d, name, &st)
		if err != nil {
			return err
		}
		return fn(in)
	})
}

// walkNames lists object names (relative to objects/sha256).
func (s *Store) walkNames(ctx context.Context, fn func(d digest.Digest, name string) error) error {
	base := filepath.Join(s.root, objectsDir)
	for i := 0; i < 256; i++ {
		if err := ctx.Err(); err != nil {
			return err
		}
		shard := fmt.Sprintf("%02x", i)
		names, err := readDirNames(filepath.Join(base, shard))
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				continue
			}
			return err
		}
		for _, n := range names {
			h := strings.TrimSuffix(n, zstSuffix)
			d := digest.NewDigestFromEncoded(digest.SHA256, h)
			if len(h) != 64 || h[:2] != shard || d.Validate() != nil {
				continue
			}
			if err := fn(d, shard+"/"+n); err != nil {
				return err
			}
		}
	}
	return nil
}
