package rootfs

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/containerd/log"
	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// Each rootfs server counts the FUSE requests it answers and how long they
// took, and publishes the totals in a small JSON file next to its config
// (StatsPath). The daemon sums the files of live servers into its
// Prometheus metrics: a rootfs server has no listener of its own, and a
// file survives the daemon's restarts without any protocol.

// StatsBuckets are the upper bounds (seconds) of the latency histogram.
var StatsBuckets = [numBuckets]float64{10e-6, 50e-6, 100e-6, 500e-6, 1e-3, 5e-3, 10e-3, 50e-3, 100e-3, 500e-3, 1}

const numBuckets = 11

// OpStats is one operation's totals, as published.
type OpStats struct {
	Count   uint64   `json:"count"`
	Seconds float64  `json:"seconds"`
	Buckets []uint64 `json:"buckets"` // cumulative counts per StatsBuckets
}

// Stats is the content of a server's stats file.
type Stats struct {
	PID     int                `json:"pid"`
	Updated time.Time          `json:"updated"`
	Ops     map[string]OpStats `json:"ops"`
}

type opCounter struct {
	count   atomic.Uint64
	nanos   atomic.Uint64
	buckets [numBuckets]atomic.Uint64 // not cumulative
}

func (c *opCounter) observe(d time.Duration) {
	c.count.Add(1)
	c.nanos.Add(uint64(d))
	s := d.Seconds()
	for i, b := range StatsBuckets {
		if s <= b {
			c.buckets[i].Add(1)
			return
		}
	}
}

// opNames are the operations worth telling apart; the rest go to "other".
var opNames = []string{"lookup", "getattr", "setattr", "open", "read", "write", "create",
	"mkdir", "mknod", "unlink", "rmdir", "rename", "link", "symlink", "readlink",
	"opendir", "readdir", "release", "fsync", "flush", "fallocate", "xattr", "statfs", "other"}

type opStats struct {
	ops map[string]*opCounter // fixed at creation: read without locks
}

func newOpStats() *opStats {
	s := &opStats{ops: make(map[string]*opCounter, len(opNames))}
	for _, n := range opNames {
		s.ops[n] = &opCounter{}
	}
	return s
}

func (s *opStats) since(op string, start time.Time) {
	s.ops[op].observe(time.Since(start))
}

func (s *opStats) snapshot() Stats {
	st := Stats{PID: os.Getpid(), Updated: time.Now().UTC(), Ops: map[string]OpStats{}}
	for n, c := range s.ops {
		count := c.count.Load()
		if count == 0 {
			continue
		}
		o := OpStats{Count: count, Seconds: float64(c.nanos.Load()) / 1e9, Buckets: make([]uint64, len(StatsBuckets))}
		var cum uint64
		for i := range StatsBuckets {
			cum += c.buckets[i].Load()
			o.Buckets[i] = cum
		}
		st.Ops[n] = o
	}
	return st
}

// StatsPath is where the server of mountpoint publishes its Stats.
func StatsPath(mountpoint string) string {
	return filepath.Join(filepath.Dir(filepath.Clean(mountpoint)), "rootfs.stats")
}

// ReadStats returns the last published Stats of the server of mountpoint.
func ReadStats(mountpoint string) (Stats, error) {
	var st Stats
	b, err := os.ReadFile(StatsPath(mountpoint))
	if err != nil {
		return st, err
	}
	return st, json.Unmarshal(b, &st)
}

func (s *opStats) publish(path string) error {
	b, err := json.Marshal(s.snapshot())
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path) // readers never see a partial file; no fsync: it is only a gauge
}

// publishLoop writes the stats file every interval until ctx is done, and
// once more at the end.
func (s *opStats) publishLoop(ctx context.Context, path string, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			_ = s.publish(path)
			return
		case <-t.C:
			if err := s.publish(path); err != nil {
				log.G(ctx).WithError(err).Debug("rootfs: publish stats")
			}
		}
	}
}

// mountCounted is fs.Mount with every request timed by st.
func mountCounted(dir string, root fs.InodeEmbedder, opts *fs.Options, st *opStats) (*fuse.Server, error) {
	raw := &countedFS{RawFileSystem: fs.NewNodeFS(root, opts), st: st}
	server, err := fuse.NewServer(raw, dir, &opts.MountOptions)
	if err != nil {
		return nil, err
	}
	if n, ok := root.(*node); ok {
		raw.r = n.r
		n.r.srv = server // before Serve: no request has arrived yet
	}
	go server.Serve()
	if err := server.WaitMount(); err != nil {
		return nil, err
	}
	return server, nil
}

// countedFS times the requests that matter for latency; everything else
// passes straight through the embedded RawFileSystem.
type countedFS struct {
	fuse.RawFileSystem
	st *opStats
	r  *rootFS
}

func (c *countedFS) Lookup(cancel <-chan struct{}, h *fuse.InHeader, name string, out *fuse.EntryOut) fuse.Status {
	defer c.st.since("lookup", time.Now())
	return c.RawFileSystem.Lookup(cancel, h, name, out)
}

func (c *countedFS) GetAttr(cancel <-chan struct{}, in *fuse.GetAttrIn, out *fuse.AttrOut) fuse.Status {
	defer c.st.since("getattr", time.Now())
	return c.RawFileSystem.GetAttr(cancel, in, out)
}

func (c *countedFS) SetAttr(cancel <-chan struct{}, in *fuse.SetAttrIn, out *fuse.AttrOut) fuse.Status {
	defer c.st.since("setattr", time.Now())
	st := c.RawFileSystem.SetAttr(cancel, in, out)
	if st.Ok() && in.Valid&fuse.FATTR_KILL_SUIDGID != 0 {
		if a, ok := c.killSuidgid(cancel, &in.InHeader, in.NodeId); ok {
			out.Attr = a // the reply carries the mode without the bits
		}
	}
	return st
}

func (c *countedFS) Open(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	defer c.st.since("open", time.Now())
	st := c.RawFileSystem.Open(cancel, in, out)
	if st.Ok() && in.Mode&fuse.OPEN_KILL_SUIDGID != 0 {
		c.killSuidgid(cancel, &in.InHeader, in.NodeId)
	}
	if c.r != nil {
		// A clean image file's passthrough backing (backing.go).
		if id, ok := c.r.takePending(cancel); ok && st.Ok() {
			out.BackingID = id
			out.OpenFlags |= fuse.FOPEN_PASSTHROUGH
			out.OpenFlags &^= fuse.FOPEN_KEEP_CACHE // the kernel fails such an open with EIO (go-fuse clears it too)
		}
	}
	return st
}

func (c *countedFS) Read(cancel <-chan struct{}, in *fuse.ReadIn, buf []byte) (fuse.ReadResult, fuse.Status) {
	defer c.st.since("read", time.Now())
	return c.RawFileSystem.Read(cancel, in, buf)
}

func (c *countedFS) Write(cancel <-chan struct{}, in *fuse.WriteIn, data []byte) (uint32, fuse.Status) {
	defer c.st.since("write", time.Now())
	n, st := c.RawFileSystem.Write(cancel, in, data)
	if st.Ok() && in.WriteFlags&fuse.WRITE_KILL_SUIDGID != 0 {
		c.killSuidgid(cancel, &in.InHeader, in.NodeId)
	}
	return n, st
}

func (c *countedFS) Create(cancel <-chan struct{}, in *fuse.CreateIn, name string, out *fuse.CreateOut) fuse.Status {
	defer c.st.since("create", time.Now())
	st := c.RawFileSystem.Create(cancel, in, name, out)
	if st.Ok() && in.OpenFlags&fuse.OPEN_KILL_SUIDGID != 0 {
		if a, ok := c.killSuidgid(cancel, &in.InHeader, out.NodeId); ok {
			out.Attr = a // the reply carries the mode without the bits
		}
	}
	return st
}

func (c *countedFS) Mkdir(cancel <-chan struct{}, in *fuse.MkdirIn, name string, out *fuse.EntryOut) fuse.Status {
	defer c.st.since("mkdir", time.Now())
	return c.RawFileSystem.Mkdir(cancel, in, name, out)
}

func (c *countedFS) Mknod(cancel <-chan struct{}, in *fuse.MknodIn, name string, out *fuse.EntryOut) fuse.Status {
	defer c.st.since("mknod", time.Now())
	return c.RawFileSystem.Mknod(cancel, in, name, out)
}

func (c *countedFS) Unlink(cancel <-chan struct{}, h *fuse.InHeader, name string) fuse.Status {
	defer c.st.since("unlink", time.Now())
	return c.RawFileSystem.Unlink(cancel, h, name)
}

func (c *countedFS) Rmdir(cancel <-chan struct{}, h *fuse.InHeader, name string) fuse.Status {
	defer c.st.since("rmdir", time.Now())
	return c.RawFileSystem.Rmdir(cancel, h, name)
}

func (c *countedFS) Rename(cancel <-chan struct{}, in *fuse.RenameIn, oldName, newName string) fuse.Status {
	defer c.st.since("rename", time.Now())
	return c.RawFileSystem.Rename(cancel, in, oldName, newName)
}

func (c *countedFS) Link(cancel <-chan struct{}, in *fuse.LinkIn, name string, out *fuse.EntryOut) fuse.Status {
	defer c.st.since("link", time.Now())
	return c.RawFileSystem.Link(cancel, in, name, out)
}

func (c *countedFS) Symlink(cancel <-chan struct{}, h *fuse.InHeader, target, name string, out *fuse.EntryOut) fuse.Status {
	defer c.st.since("symlink", time.Now())
	return c.RawFileSystem.Symlink(cancel, h, target, name, out)
}

func (c *countedFS) Readlink(cancel <-chan struct{}, h *fuse.InHeader) ([]byte, fuse.Status) {
	defer c.st.since("readlink", time.Now())
	return c.RawFileSystem.Readlink(cancel, h)
}

func (c *countedFS) Release(cancel <-chan struct{}, in *fuse.ReleaseIn) {
	defer c.st.since("release", time.Now())
	c.RawFileSystem.Release(cancel, in)
}

func (c *countedFS) Fsync(cancel <-chan struct{}, in *fuse.FsyncIn) fuse.Status {
	defer c.st.since("fsync", time.Now())
	return c.RawFileSystem.Fsync(cancel, in)
}

func (c *countedFS) Flush(cancel <-chan struct{}, in *fuse.FlushIn) fuse.Status {
	defer c.st.since("flush", time.Now())
	return c.RawFileSystem.Flush(cancel, in)
}

func (c *countedFS) Fallocate(cancel <-chan struct{}, in *fuse.FallocateIn) fuse.Status {
	defer c.st.since("fallocate", time.Now())
	return c.RawFileSystem.Fallocate(cancel, in)
}

func (c *countedFS) GetXAttr(cancel <-chan struct{}, h *fuse.InHeader, attr string, dest []byte) (uint32, fuse.Status) {
	defer c.st.since("xattr", time.Now())
	return c.RawFileSystem.GetXAttr(cancel, h, attr, dest)
}

func (c *countedFS) ListXAttr(cancel <-chan struct{}, h *fuse.InHeader, dest []byte) (uint32, fuse.Status) {
	defer c.st.since("xattr", time.Now())
	return c.RawFileSystem.ListXAttr(cancel, h, dest)
}

func (c *countedFS) SetXAttr(cancel <-chan struct{}, in *fuse.SetXAttrIn, attr string, data []byte) fuse.Status {
	defer c.st.since("xattr", time.Now())
	return c.RawFileSystem.SetXAttr(cancel, in, attr, data)
}

func (c *countedFS) StatFs(cancel <-chan struct{}, h *fuse.InHeader, out *fuse.StatfsOut) fuse.Status {
	defer c.st.since("statfs", time.Now())
	return c.RawFileSystem.StatFs(cancel, h, out)
}

func (c *countedFS) Access(cancel <-chan struct{}, in *fuse.AccessIn) fuse.Status {
	defer c.st.since("other", time.Now())
	return c.RawFileSystem.Access(cancel, in)
}

func (c *countedFS) Writev(cancel <-chan struct{}, in *fuse.WriteIn, data [][]byte) (uint32, fuse.Status) {
	defer c.st.since("write", time.Now())
	n, st := c.RawFileSystem.Writev(cancel, in, data)
	if st.Ok() && in.WriteFlags&fuse.WRITE_KILL_SUIDGID != 0 {
		c.killSuidgid(cancel, &in.InHeader, in.NodeId)
	}
	return n, st
}
