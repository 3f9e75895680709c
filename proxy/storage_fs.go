package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
)

// fsBlobStore is the local BlobStore: <dir>/<alg>/<2 hex>/<hex>.
type fsBlobStore struct {
	dir    string
	noSync bool
}

func newFSBlobStore(dir string, noSync bool) (*fsBlobStore, error) {
	if err := os.MkdirAll(filepath.Join(dir, "tmp"), 0o700); err != nil {
		return nil, fmt.Errorf("creating blob store: %w", err)
	}
	return &fsBlobStore{dir: dir, noSync: noSync}, nil
}

func (s *fsBlobStore) path(d digest.Digest) (string, error) {
	if err := d.Validate(); err != nil {
		return "", err
	}
	h := d.Encoded()
	return filepath.Join(s.dir, string(d.Algorithm()), h[:2], h), nil
}

func (s *fsBlobStore) Stat(_ context.Context, d digest.Digest) (int64, error) {
	p, err := s.path(d)
	if err != nil {
		return 0, err
	}
	fi, err := os.Stat(p)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, errNotFound
	}
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}

func (s *fsBlobStore) Open(_ context.Context, d digest.Digest) (io.ReadSeekCloser, int64, error) {
	p, err := s.path(d)
	if err != nil {
		return nil, 0, err
	}
	f, err := os.Open(p)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, 0, errNotFound
	}
	if err != nil {
		return nil, 0, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, 0, err
	}
	return f, fi.Size(), nil
}

func (s *fsBlobStore) Put(_ context.Context, d digest.Digest, size int64, r io.Reader) error {
	p, err := s.path(d)
	if err != nil {
		return err
	}
	if _, err := os.Stat(p); err == nil {
		return nil
	}
	tmp, err := os.CreateTemp(filepath.Join(s.dir, "tmp"), "put-")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()
	v := d.Verifier()
	n, err := io.Copy(io.MultiWriter(tmp, v), r)
	if err != nil {
		return fmt.Errorf("writing blob %s: %w", d, err)
	}
	if (size >= 0 && n != size) || !v.Verified() {
		return fmt.Errorf("blob %s: %w (got %d bytes)", d, errDigestMismatch, n)
	}
	if !s.noSync {
		if err := tmp.Sync(); err != nil {
			return err
		}
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	if err := os.Chmod(tmp.Name(), 0o444); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), p); err != nil {
		return fmt.Errorf("storing blob %s: %w", d, err)
	}
	return nil
}

func (s *fsBlobStore) Delete(_ context.Context, d digest.Digest) error {
	p, err := s.path(d)
	if err != nil {
		return err
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

func (s *fsBlobStore) Walk(ctx context.Context, fn func(d digest.Digest, size int64, mod time.Time) error) error {
	for _, alg := range []digest.Algorithm{digest.SHA256, digest.SHA384, digest.SHA512} {
		root := filepath.Join(s.dir, string(alg))
		err := filepath.WalkDir(root, func(p string, de fs.DirEntry, err error) error {
			if err != nil {
				if errors.Is(err, fs.ErrNotExist) {
					return nil
				}
				return err
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if de.IsDir() {
				return nil
			}
			d := digest.NewDigestFromEncoded(alg, de.Name())
			if d.Validate() != nil {
				return nil
			}
			fi, err := de.Info()
			if err != nil {
				return nil
			}
			return fn(d, fi.Size(), fi.ModTime())
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// fsMetaStore is the local MetaStore: one small file per key.
type fsMetaStore struct {
	dir    string
	noSync bool
}

func newFSMetaStore(dir string, noSync bool) (*fsMetaStore, error) {
	if err := os.MkdirAll(filepath.Join(dir, ".tmp"), 0o700); err != nil {
		return nil, fmt.Errorf("creating meta store: %w", err)
	}
	return &fsMetaStore{dir: dir, noSync: noSync}, nil
}

func (s *fsMetaStore) path(key string) (string, error) {
	// Keys are built from validated names; refuse anything that could escape.
	if key == "" || strings.HasPrefix(key, "/") || strings.Contains(key, "..") || strings.Contains(key, "//") {
		return "", fmt.Errorf("invalid meta key %q", key)
	}
	return filepath.Join(s.dir, filepath.FromSlash(key)), nil
}

func (s *fsMetaStore) Get(_ context.Context, key string) ([]byte, error) {
	p, err := s.path(key)
	if err != nil {
		return nil, err
	}
	b, err := os.ReadFile(p)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, errNotFound
	}
	return b, err
}

func (s *fsMetaStore) Put(_ context.Context, key string, b []byte) error {
	p, tmp, err := s.stage(key, b)
	if err != nil {
		return err
	}
	defer os.Remove(tmp)
	return os.Rename(tmp, p)
}

func (s *fsMetaStore) Create(_ context.Context, key string, b []byte) error {
	p, tmp, err := s.stage(key, b)
	if err != nil {
		return err
	}
	defer os.Remove(tmp)
	// link(2) never replaces: exactly one creator wins.
	if err := os.Link(tmp, p); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return errExists
		}
		return err
	}
	return nil
}

// stage writes b to a synced temp file beside the store and returns the
// record's final path and the temp's; the caller publishes and removes it.
func (s *fsMetaStore) stage(key string, b []byte) (p, tmpName string, err error) {
	if p, err = s.path(key); err != nil {
		return "", "", err
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return "", "", err
	}
	tmp, err := os.CreateTemp(filepath.Join(s.dir, ".tmp"), "meta-")
	if err != nil {
		return "", "", err
	}
	_, err = tmp.Write(b)
	if err == nil && !s.noSync {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(tmp.Name())
		return "", "", err
	}
	return p, tmp.Name(), nil
}

func (s *fsMetaStore) Delete(_ context.Context, key string) error {
	p, err := s.path(key)
	if err != nil {
		return err
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

func (s *fsMetaStore) List(ctx context.Context, prefix string) ([]string, error) {
	p, err := s.path(strings.TrimSuffix(prefix, "/"))
	if err != nil {
		return nil, err
	}
	var keys []string
	err = filepath.WalkDir(p, func(q string, de fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if de.IsDir() {
			return nil
		}
		rel, err := filepath.Rel(s.dir, q)
		if err != nil {
			return err
		}
		keys = append(keys, filepath.ToSlash(rel))
		return nil
	})
	return keys, err
}
