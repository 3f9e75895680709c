package layout

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/dupsnap/dupsnap/pkg/cas"
)

// Store keeps manifests durably under <dir>/sha256/<hex of diffID>, one
// file each, and uses them as the GC roots of its CAS. Safe for concurrent
// use by goroutines and processes (every write is a rename of a complete,
// fsync'd file).
type Store struct {
	dir string
	c   *cas.Store
}

// ImportStats tells what an import added.
type ImportStats struct {
	Objects    int   // unique objects the layer references
	NewObjects int   // of those, how many the store did not have
	NewBytes   int64 // their logical size
}

const tempPrefix = ".tmp-"

// staleTemp is how old a manifest temp file must be before OpenStore
// removes it (another process may be writing one right now).
const staleTemp = 10 * time.Minute

// OpenStore opens (creating) a manifest store in dir over c.
func OpenStore(dir string, c *cas.Store) (*Store, error) {
	if err := os.MkdirAll(filepath.Join(dir, "sha256"), 0o700); err != nil {
		return nil, fmt.Errorf("layout: open store: %w", err)
	}
	s := &Store{dir: dir, c: c}
	s.sweepTemps()
	return s, nil
}

// CAS returns the object store the manifests point into.
func (s *Store) CAS() *cas.Store { return s.c }

// Dir is the store's directory.
func (s *Store) Dir() string { return s.dir }

func (s *Store) path(d digest.Digest) (string, error) {
	if d.Algorithm() != digest.SHA256 || d.Validate() != nil {
		return "", fmt.Errorf("layout: invalid diffID %q: %w", d, ErrNotFound)
	}
	return filepath.Join(s.dir, "sha256", d.Encoded()), nil
}

func (s *Store) sweepTemps() {
	shard := filepath.Join(s.dir, "sha256")
	ents, _ := os.ReadDir(shard)
	for _, e := range ents {
		if !strings.HasPrefix(e.Name(), tempPrefix) {
			continue
		}
		if fi, err := e.Info(); err == nil && time.Since(fi.ModTime()) > staleTemp {
			_ = os.Remove(filepath.Join(shard, e.Name()))
		}
	}
}

// Import ingests a layer into the CAS and stores its manifest: the lease is
// held from the first object put until the manifest is durable, so a
// concurrent Collect can never delete what the new manifest references.
func (s *Store) Import(ctx context.Context, r io.Reader, opts IngestOptions) (*Manifest, error) {
	m, _, err := s.ImportWithStats(ctx, r, opts)
	return m, err
}

// ImportWithStats is Import that also reports what the layer added.
func (s *Store) ImportWithStats(ctx context.Context, r io.Reader, opts IngestOptions) (*Manifest, ImportStats, error) {
	var st ImportStats
	release, err := s.c.Lease(ctx)
	if err != nil {
		return nil, st, fmt.Errorf("layout: import: %w", err)
	}
	defer release()
	b := s.c.NewBatch()
	m, err := Ingest(ctx, b, r, opts)
	if err != nil {
		b.Abort()
		return nil, st, err
	}
	// Objects of this batch become visible at Commit: what Has does not see
	// now is new (or being added concurrently by someone else).
	for d, size := range m.ObjectSizes() {
		st.Objects++
		if !s.c.Has(d) {
			st.NewObjects++
			st.NewBytes += size
		}
	}
	if err := b.Commit(ctx); err != nil {
		return nil, st, fmt.Errorf("layout: import %s: commit objects: %w", m.DiffID, err)
	}
	if err := s.Put(ctx, m); err != nil {
		return nil, st, err
	}
	log.G(ctx).WithFields(log.Fields{"diff_id": m.DiffID, "entries": len(m.Entries), "new_bytes": st.NewBytes}).Debug("layer imported")
	return m, st, nil
}

// Put stores m atomically and durably (temp file, fsync, rename, dir fsync).
func (s *Store) Put(ctx context.Context, m *Manifest) error {
	final, err := s.path(m.DiffID)
	if err != nil {
		return err
	}
	b, err := m.Marshal()
	if err != nil {
		return err
	}
	var rnd [8]byte
	_, _ = rand.Read(rnd[:])
	tmp := filepath.Join(s.dir, "sha256", tempPrefix+hex.EncodeToString(rnd[:]))
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("layout: put manifest: %w", err)
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, final)
	}
	if err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("layout: put manifest %s: %w", m.DiffID, err)
	}
	return syncDir(filepath.Dir(final))
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("layout: fsync %s: %w", dir, err)
	}
	return nil
}

// Get reads and verifies the manifest of diffID (ErrNotFound if absent).
func (s *Store) Get(ctx context.Context, diffID digest.Digest) (*Manifest, error) {
	p, err := s.path(diffID)
	if err != nil {
		return nil, err
	}
	b, err := os.ReadFile(p)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%s: %w", diffID, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("layout: read manifest %s: %w", diffID, err)
	}
	m, err := Unmarshal(b)
	if err != nil {
		return nil, fmt.Errorf("manifest %s: %w", diffID, err)
	}
	if m.DiffID != diffID {
		return nil, fmt.Errorf("manifest %s: %w: describes %s", diffID, ErrCorruptManifest, m.DiffID)
	}
	return m, nil
}

// Has reports whether a manifest for diffID is stored.
func (s *Store) Has(diffID digest.Digest) bool {
	p, err := s.path(diffID)
	if err != nil {
		return false
	}
	_, err = os.Stat(p)
	return err == nil
}

// Delete removes the manifest of diffID (its objects go at the next Collect).
func (s *Store) Delete(ctx context.Context, diffID digest.Digest) error {
	p, err := s.path(diffID)
	if err != nil {
		return err
	}
	if err := os.Remove(p); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("%s: %w", diffID, ErrNotFound)
		}
		return fmt.Errorf("layout: delete manifest %s: %w", diffID, err)
	}
	return syncDir(filepath.Dir(p))
}

// List returns the diffIDs of every stored manifest.
func (s *Store) List(ctx context.Context) ([]digest.Digest, error) {
	ents, err := os.ReadDir(filepath.Join(s.dir, "sha256"))
	if err != nil {
		return nil, fmt.Errorf("layout: list manifests: %w", err)
	}
	out := make([]digest.Digest, 0, len(ents))
	for _, e := range ents {
		d := digest.NewDigestFromEncoded(digest.SHA256, e.Name())
		if d.Validate() == nil {
			out = append(out, d)
		}
	}
	return out, nil
}

// Collect deletes every CAS object that no stored manifest references and
// that is older than grace. The root set is read on the first keep call,
// which cas.Collect makes under its exclusive lock, i.e. after every import
// that holds a lease has made its manifest durable. A manifest that cannot
// be read makes Collect keep everything (and return the error).
func (s *Store) Collect(ctx context.Context, grace time.Duration) (int, int64, error) {
	var (
		keepSet map[digest.Digest]struct{}
		rootErr error
		loaded  bool
	)
	keep := func(d digest.Digest) bool {
		if !loaded {
			loaded = true
			keepSet, rootErr = s.roots(ctx)
		}
		if rootErr != nil {
			return true
		}
		_, ok := keepSet[d]
		return ok
	}
	n, freed, err := s.c.Collect(ctx, keep, grace)
	if err == nil {
		err = rootErr
	}
	return n, freed, err
}

func (s *Store) roots(ctx context.Context) (map[digest.Digest]struct{}, error) {
	ids, err := s.List(ctx)
	if err != nil {
		return nil, err
	}
	set := map[digest.Digest]struct{}{}
	for _, id := range ids {
		m, err := s.Get(ctx, id)
		if err != nil {
			if errors.Is(err, ErrNotFound) {
				continue // deleted meanwhile
			}
			return nil, err
		}
		for _, d := range m.Objects() {
			set[d] = struct{}{}
		}
	}
	return set, nil
}

// OpenRoot opens the store layout that dupsnap uses under root:
// <root>/cas (objects) and <root>/manifests (this Store). The snapshotter
// daemon's root has the same layout, so the store tools work on it live.
func OpenRoot(root string) (*cas.Store, *Store, error) {
	c, err := cas.Open(filepath.Join(root, "cas"), cas.Options{})
	if err != nil {
		return nil, nil, err
	}
	s, err := OpenStore(filepath.Join(root, "manifests"), c)
	if err != nil {
		c.Close()
		return nil, nil, err
	}
	return c, s, nil
}
