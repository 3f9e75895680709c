package rootfs

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// objectFds counts this process's descriptors open on the CAS object of
// content body (the in-process server's backings).
func objectFds(t *testing.T, e *env, body string) int {
	t.Helper()
	f, err := e.cas.OpenFile(digest.FromString(body))
	if err != nil {
		t.Fatal(err)
	}
	name := f.Name()
	f.Close()
	ents, _ := os.ReadDir("/proc/self/fd")
	n := 0
	for _, d := range ents {
		if l, err := os.Readlink(filepath.Join("/proc/self/fd", d.Name())); err == nil && l == name {
			n++
		}
	}
	return n
}

// A passthrough file's CAS object and backing id are kept after the last
// close (the next open costs no syscall), up to maxIdleBackings idle ones;
// evicted backings are reopened correctly.
func TestBackingKeptAcrossOpens(t *testing.T) {
	needRoot(t)
	old, oldStats := maxIdleBackings, statsInterval
	maxIdleBackings, statsInterval = 2, 20*time.Millisecond
	t.Cleanup(func() { maxIdleBackings, statsInterval = old, oldStats })
	e := newEnv(t)
	var ents []tarEntry
	var bodies []string
	for i := 0; i < 4; i++ {
		b := strings.Repeat(fmt.Sprintf("%015d\n", i), (512<<10)/16)
		bodies = append(bodies, b)
		ents = append(ents, tarEntry{name: fmt.Sprint("f", i), body: b})
	}
	cfg := activeCfg(e, []digest.Digest{e.addLayer(t, makeTar(t, ents))})
	serve(t, cfg)
	// The LRU order is the order in which RELEASEs reach the server, which
	// the kernel sends asynchronously: wait for each file's release (as
	// many handled as opened, from the published op stats) before the next
	// read, so that the order is the test's.
	// Counted against the test's own opens: published stats may predate
	// the last OPEN, so open minus release counts could look settled early.
	opens, held := 0, 0 // files the test opened; handles it keeps open
	released := func() int {
		st, err := ReadStats(cfg.Mountpoint)
		if err != nil {
			return -1
		}
		return int(st.Ops["release"].Count)
	}
	read := func(i int) {
		t.Helper()
		b, err := os.ReadFile(filepath.Join(cfg.Mountpoint, fmt.Sprint("f", i)))
		opens++
		if err != nil || !bytes.Equal(b, []byte(bodies[i])) {
			t.Fatalf("f%d: %d bytes, %v", i, len(b), err)
		}
		settled(t, "releases of the files the test closed", opens-held, released)
	}
	for k := 0; k < 3; k++ {
		read(0)
	}
	settled(t, "descriptors of f0's object after 3 open/close (kept, not reopened)", 1, func() int { return objectFds(t, e, bodies[0]) })
	for i := 1; i < 4; i++ {
		read(i)
	}
	// RELEASE is asynchronous: a closed file's backing turns idle (and
	// the least recently used one is evicted) when the server gets to it.
	settled(t, "descriptors of the least recently used objects (evicted)", 0, func() int {
		return objectFds(t, e, bodies[0]) + objectFds(t, e, bodies[1])
	})
	settled(t, "descriptors of f3's object", 1, func() int { return objectFds(t, e, bodies[3]) })
	// Evicted while another open handle holds the inode's backing: the
	// kernel needs the same backing for every open of an inode.
	h, err := os.Open(filepath.Join(cfg.Mountpoint, "f0"))
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	opens, held = opens+1, 1
	for i := 1; i < 4; i++ {
		read(i)
	}
	read(0)
	buf := make([]byte, 16)
	if _, err := h.ReadAt(buf, 16); err != nil || string(buf) != bodies[0][16:32] {
		t.Fatalf("held f0: %q %v", buf, err)
	}
	if n := opCount(t, cfg.Mountpoint, "read"); n != 0 {
		t.Fatalf("%d READs reached the server: not passthrough", n)
	}
}
