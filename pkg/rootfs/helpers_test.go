package rootfs

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/dupsnap/dupsnap/pkg/cas"
	"github.com/dupsnap/dupsnap/pkg/layout"
)

// liveConns holds a handle on the FUSE connection of every in-process
// mount of this test binary. A deadlocked in-process server leaves the
// binary unable to exit (threads stuck in request_wait_answer make it a
// zombie that `go test` waits on forever), so before -test.timeout fires,
// and at exit, every connection still around is aborted: a hang becomes a
// failure instead of a stalled CI.
var liveConns struct {
	sync.Mutex
	files []*os.File
}

func abortLiveConns() {
	liveConns.Lock()
	defer liveConns.Unlock()
	for _, f := range liveConns.files {
		abortConn(f) // a no-op for connections already gone
	}
}

func TestMain(m *testing.M) {
	flag.Parse()
	if tf := flag.Lookup("test.timeout"); tf != nil {
		if d, err := time.ParseDuration(tf.Value.String()); err == nil && d > time.Minute {
			time.AfterFunc(d-30*time.Second, func() {
				fmt.Fprintln(os.Stderr, "rootfs tests: near -test.timeout, aborting every in-process FUSE connection")
				abortLiveConns()
			})
		}
	}
	code := m.Run()
	abortLiveConns()
	if binPath != "" && os.Getenv("DUPSNAP_BIN") == "" {
		os.RemoveAll(filepath.Dir(binPath))
	}
	os.Exit(code)
}

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (FUSE mounts)")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("no /dev/fuse")
	}
}

// env is a CAS + manifest store in a temp dir.
type env struct {
	dir string
	cas *cas.Store
	ms  *layout.Store
}

func newEnv(t *testing.T) *env {
	t.Helper()
	return newEnvIn(t, t.TempDir())
}

// newEnvIn is newEnv with its store under dir.
func newEnvIn(t *testing.T, dir string) *env {
	t.Helper()
	c, err := cas.Open(filepath.Join(dir, "cas"), cas.Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	ms, err := layout.OpenStore(filepath.Join(dir, "manifests"), c)
	if err != nil {
		t.Fatal(err)
	}
	return &env{dir: dir, cas: c, ms: ms}
}

// tarEntry is one member of a test layer.
type tarEntry struct {
	name, body, link string
	typ              byte
	mode             int64
	uid, gid         int
	major, minor     int64
	xattrs           map[string]string
}

var testTime = time.Unix(1700000000, 0)

func makeTar(t *testing.T, ents []tarEntry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range ents {
		h := &tar.Header{Name: e.name, Typeflag: e.typ, Mode: e.mode, Uid: e.uid, Gid: e.gid,
			ModTime: testTime, Linkname: e.link, Devmajor: e.major, Devminor: e.minor, Format: tar.FormatPAX}
		if h.Typeflag == 0 {
			h.Typeflag = tar.TypeReg
		}
		if h.Mode == 0 {
			h.Mode = 0o644
			if h.Typeflag == tar.TypeDir {
				h.Mode = 0o755
			}
		}
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(e.body))
		}
		if len(e.xattrs) > 0 {
			h.PAXRecords = map[string]string{}
			for k, v := range e.xattrs {
				h.PAXRecords["SCHILY.xattr."+k] = v
			}
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if h.Typeflag == tar.TypeReg {
			tw.Write([]byte(e.body))
		}
	}
	tw.Close()
	return buf.Bytes()
}

// addLayer ingests a tar into the env and returns its diffID.
func (e *env) addLayer(t *testing.T, tarball []byte) digest.Digest {
	t.Helper()
	m, err := e.ms.Import(context.Background(), bytes.NewReader(tarball), layout.IngestOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return m.DiffID
}

// serve mounts cfg in-process; cleanup unmounts and, if that fails,
// aborts the connection so nothing can hang. Never mmap such a mount from
// the test: use serveProc for that.
func serve(t *testing.T, cfg Config) (stop func()) {
	t.Helper()
	if err := os.MkdirAll(cfg.Mountpoint, 0o755); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	ready := make(chan struct{})
	cfg.ready = ready // wait for the poll hack before any I/O: see Serve
	go func() { done <- Serve(ctx, cfg) }()
	select {
	case <-ready:
		if conn := openConn(cfg.Mountpoint); conn != nil {
			liveConns.Lock()
			liveConns.files = append(liveConns.files, conn)
			liveConns.Unlock()
		}
	case err := <-done:
		cancel()
		t.Fatalf("Serve: %v", err)
	case <-time.After(10 * time.Second):
		cancel()
		forceUnmount(cfg.Mountpoint)
		t.Fatal("mount did not become ready")
	}
	stopped := false
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(15 * time.Second):
			t.Errorf("Serve did not return")
		}
		forceUnmount(cfg.Mountpoint)
	}
	t.Cleanup(stop)
	return stop
}

// extractLower copies the merged tree of layers, read through a read-only
// view, into e.dir/lower: the lower dir of an overlayfs baseline.
func extractLower(t *testing.T, e *env, layers []digest.Digest) string {
	t.Helper()
	view := Config{Mountpoint: filepath.Join(e.dir, "view", "rootfs"), CASRoot: e.cas.Root(),
		ManifestRoot: filepath.Join(e.dir, "manifests"), Layers: layers, ReadOnly: true}
	stopView := serve(t, view)
	lower := filepath.Join(e.dir, "lower")
	if err := os.MkdirAll(lower, 0o755); err != nil {
		t.Fatal(err)
	}
	copyTree(t, view.Mountpoint, lower)
	stopView()
	return lower
}

// serveProc is serve with the server in its own process (Start), for
// tests that touch the mount through mmap: a page fault on an in-process
// mount keeps its thread (and P) in the kernel until this very process's
// server answers, and a stop-the-world GC then stops that server too (seen
// in a CI trial: TestOverlayDifferential hung in mmapWrite's memmove).
func serveProc(t *testing.T, cfg Config) (stop func()) {
	t.Helper()
	if err := os.MkdirAll(cfg.Mountpoint, 0o755); err != nil {
		t.Fatal(err)
	}
	startServer(t, dupsnapBin(t), cfg, cfg.Mountpoint+".log")
	stopped := false
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		if err := Stop(ctx, cfg.Mountpoint); err != nil {
			t.Errorf("Stop: %v", err)
		}
	}
	t.Cleanup(stop)
	return stop
}

// startServer runs cfg in a real rootfs server process (Start) and
// registers its kill and unmount for cleanup; it returns the server's pid.
func startServer(t *testing.T, bin string, cfg Config, logFile string) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	pid, err := Start(ctx, bin, cfg, logFile)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		syscall.Kill(pid, syscall.SIGKILL)
		forceUnmount(cfg.Mountpoint)
	})
	return pid
}

// forceUnmount is the last resort of every test: abort + detach.
func forceUnmount(mp string) {
	for i := 0; i < 5; i++ {
		if e, ok := findMount(mp); !ok || !strings.HasPrefix(e.fstype, "fuse") {
			return
		}
		if conn := openConn(mp); conn != nil {
			abortConn(conn) // through a verified handle: never someone else's
			conn.Close()
		}
		syscall.Unmount(mp, syscall.MNT_DETACH)
	}
}

// fileInfo is what the differential tests compare.
type fileInfo struct {
	Type     uint32
	Mode     uint32
	UID, GID uint32
	Size     int64
	Sum      string
	Link     string
	Rdev     uint64
	Nlink    uint64
	Xattrs   string
}

// snapshotTree records every entry under root (ino groups for hardlinks).
func snapshotTree(t *testing.T, root string) (map[string]fileInfo, [][]string) {
	t.Helper()
	out := map[string]fileInfo{}
	inos := map[uint64][]string{}
	err := filepath.Walk(root, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if rel == "." {
			return nil
		}
		st := fi.Sys().(*syscall.Stat_t)
		in := fileInfo{Type: st.Mode & syscall.S_IFMT, Mode: st.Mode & 07777, UID: st.Uid, GID: st.Gid}
		switch in.Type {
		case syscall.S_IFREG:
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			s := sha256.Sum256(b)
			in.Sum, in.Size, in.Nlink = hex.EncodeToString(s[:]), st.Size, uint64(st.Nlink)
			inos[st.Ino] = append(inos[st.Ino], rel)
		case syscall.S_IFLNK:
			in.Link, _ = os.Readlink(p)
		case syscall.S_IFCHR, syscall.S_IFBLK:
			in.Rdev = st.Rdev
		}
		in.Xattrs = listXattrs(p)
		out[rel] = in
		return nil
	})
	if err != nil {
		t.Fatalf("walk %s: %v", root, err)
	}
	var groups [][]string
	for _, g := range inos {
		if len(g) > 1 {
			sort.Strings(g)
			groups = append(groups, g)
		}
	}
	sort.Slice(groups, func(i, j int) bool { return groups[i][0] < groups[j][0] })
	return out, groups
}

func listXattrs(p string) string {
	buf := make([]byte, 4096)
	n, err := unix.Llistxattr(p, buf)
	if err != nil || n == 0 {
		return ""
	}
	names := strings.Split(strings.TrimRight(string(buf[:n]), "\x00"), "\x00")
	sort.Strings(names)
	var sb strings.Builder
	for _, k := range names {
		if strings.HasPrefix(k, "trusted.overlay") || strings.HasPrefix(k, "system.") {
			continue
		}
		v := make([]byte, 4096)
		m, _ := unix.Lgetxattr(p, k, v)
		fmt.Fprintf(&sb, "%s=%q;", k, v[:max(m, 0)])
	}
	return sb.String()
}

func compareTrees(t *testing.T, what, a, b string) {
	t.Helper()
	ta, ga := snapshotTree(t, a)
	tb, gb := snapshotTree(t, b)
	for p, x := range ta {
		y, ok := tb[p]
		if !ok {
			t.Errorf("%s: %s only in %s (%+v)", what, p, a, x)
		} else if x != y {
			t.Errorf("%s: %s differs:\n  %+v\n  %+v", what, p, x, y)
		}
	}
	for p := range tb {
		if _, ok := ta[p]; !ok {
			t.Errorf("%s: %s only in %s", what, p, b)
		}
	}
	if fmt.Sprint(ga) != fmt.Sprint(gb) {
		t.Errorf("%s: hardlink groups differ: %v vs %v", what, ga, gb)
	}
}

func fmtAny(v any) string { return fmt.Sprint(v) }

func isErrno(err error, want syscall.Errno) bool {
	var e syscall.Errno
	return err != nil && errorsAs(err, &e) && e == want
}

var errorsAs = errors.As

// settled waits (bounded) until count() == want, for server state that
// lags the test (the kernel sends RELEASE after close(2) returns; pools are
// refilled in the background).
func settled(t *testing.T, what string, want int, count func() int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		n := count()
		if n == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d %s, want %d", n, what, want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// overlayAt mounts overlayfs at ovl over lower, with its upper and work
// dirs beside it (ovl-u, ovl-w), for the measurements' side-by-side
// baseline; it is unmounted at cleanup, or earlier by the returned func.
func overlayAt(t *testing.T, lower, ovl string) (unmount func()) {
	t.Helper()
	for _, d := range []string{ovl, ovl + "-u", ovl + "-w"} {
		os.MkdirAll(d, 0o755)
	}
	if err := syscall.Mount("overlay", ovl, "overlay", 0, "lowerdir="+lower+",upperdir="+ovl+"-u,workdir="+ovl+"-w"); err != nil {
		t.Fatal(err)
	}
	unmount = func() { syscall.Unmount(ovl, syscall.MNT_DETACH) }
	t.Cleanup(unmount)
	return unmount
}
