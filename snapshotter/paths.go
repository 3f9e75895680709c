package snapshotter

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

// snapPaths are the files of one snapshot under <root>/snapshots/<id>.
//
//	manifest  committed: the layout key (manifest DiffID) of its layer
//	staged    active, layer already on node: the manifest key to commit
//	ingesting active unpack: Commit started adopting the staging dir's files
//	fs, work  active unpack: overlay upperdir (staging) and workdir
//	lower/mnt active unpack with parent: read-only rootfs view of the parent chain
//	mnt       active/view: mountpoint of the rootfs server (rootfs keeps
//	          rootfs.json and rootfs.pid next to its mountpoint)
//	state     active: the rootfs server's writable state
type snapPaths string

func (s *Snapshotter) paths(id string) snapPaths {
	return snapPaths(filepath.Join(s.root, "snapshots", id))
}

func (p snapPaths) dir() string      { return string(p) }
func (p snapPaths) manifest() string { return filepath.Join(string(p), "manifest") }
func (p snapPaths) staged() string   { return filepath.Join(string(p), "staged") }
func (p snapPaths) ingesting() string {
	return filepath.Join(string(p), "ingesting") // an unpack's Commit began adopting its files
}
func (p snapPaths) upper() string    { return filepath.Join(string(p), "fs") }
func (p snapPaths) work() string     { return filepath.Join(string(p), "work") }
func (p snapPaths) lowerDir() string { return filepath.Join(string(p), "lower") }
func (p snapPaths) lower() string    { return filepath.Join(string(p), "lower", "mnt") }
func (p snapPaths) mnt() string      { return filepath.Join(string(p), "mnt") }
func (p snapPaths) state() string    { return filepath.Join(string(p), "state") }
func (p snapPaths) log() string      { return filepath.Join(string(p), "rootfs.log") }
func (p snapPaths) lowerLog() string { return filepath.Join(string(p), "lower", "rootfs.log") }

type snapMode int

const (
	modeRootfs snapMode = iota // view or active served by a rootfs process
	modeUnpack                 // overlay staging dir written by the applier
	modeStaged                 // layer already on node, committed without apply
)

// modeOf tells how an active snapshot is backed, from what its dir holds.
func (s *Snapshotter) modeOf(id string) snapMode {
	p := s.paths(id)
	if _, err := os.Lstat(p.staged()); err == nil {
		return modeStaged
	}
	if _, err := os.Lstat(p.work()); err == nil {
		return modeUnpack
	}
	return modeRootfs
}

// writeFileAtomic writes data durably under name (temp file, fsync, rename, dir fsync).
func writeFileAtomic(name string, data []byte) error {
	dir := filepath.Dir(name)
	f, err := os.CreateTemp(dir, ".tmp-"+filepath.Base(name))
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(f.Name(), name); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

func readDigestFile(name string) (digest.Digest, error) {
	b, err := os.ReadFile(name)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return "", fmt.Errorf("%s: %w", name, errdefs.ErrNotFound)
		}
		return "", err
	}
	d, err := digest.Parse(strings.TrimSpace(string(b)))
	if err != nil {
		return "", fmt.Errorf("%s: %v: %w", name, err, errdefs.ErrDataLoss)
	}
	return d, nil
}

// manifestKey is the layer manifest of a committed snapshot.
func (s *Snapshotter) manifestKey(id string) (digest.Digest, error) {
	return readDigestFile(s.paths(id).manifest())
}

// The diffID index maps the real diffID of a pulled layer (label
// containerd.io/snapshot/diff-id) to the key of the manifest Commit made
// from its staging dir, whose DiffID is synthesised: the next pull of the
// same layer then finds it.
func (s *Snapshotter) diffIDPath(d digest.Digest) string {
	return filepath.Join(s.root, "diffids", d.Algorithm().String()+"-"+d.Encoded())
}

func (s *Snapshotter) recordDiffID(real, key digest.Digest) error {
	if real == "" || real == key {
		return nil
	}
	return writeFileAtomic(s.diffIDPath(real), []byte(key.String()+"\n"))
}

// lookupLayer returns the manifest key holding the layer with this real
// diffID, if the node has it.
func (s *Snapshotter) lookupLayer(real digest.Digest) (digest.Digest, bool) {
	if real == "" || real.Validate() != nil {
		return "", false
	}
	if s.layers.Has(real) {
		return real, true
	}
	k, err := readDigestFile(s.diffIDPath(real))
	if err != nil || !s.layers.Has(k) {
		return "", false
	}
	return k, true
}

// mountsUnder lists mountpoints at or below dir, deepest first.
func mountsUnder(dir string) ([]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMountinfo(fields[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			out = append(out, mp)
		}
	}
	for i, j := 0, len(out)-1; i < j; i, j = i+1, j-1 {
		out[i], out[j] = out[j], out[i]
	}
	return out, sc.Err()
}

func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v int
			if _, err := fmt.Sscanf(s[i+1:i+4], "%03o", &v); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// removeDir deletes a snapshot dir, but never through a live mount: a
// RemoveAll across a FUSE mountpoint would delete a container's files.
// Leftover mounts are detached first.
func removeDir(dir string) error {
	mps, err := mountsUnder(dir)
	if err != nil {
		return err
	}
	for _, mp := range mps {
		if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("unmount %s: %w", mp, err)
		}
	}
	if mps, _ = mountsUnder(dir); len(mps) > 0 {
		return fmt.Errorf("still mounted under %s: %v: %w", dir, mps, errdefs.ErrFailedPrecondition)
	}
	return os.RemoveAll(dir)
}
