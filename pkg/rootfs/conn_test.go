package rootfs

import (
	"os"
	"path/filepath"
	"testing"
)

// TestAbortStaleConnHandle: a handle on the fusectl dir of a connection
// that is gone must not abort the next mount, which the kernel typically
// gives the same connection number (the bug of the old Stop).
func TestAbortStaleConnHandle(t *testing.T) {
	needRoot(t)
	e := newEnv(t)
	layers := baseLayers(t, e)
	cfg := func(name string) Config {
		return Config{Mountpoint: filepath.Join(e.dir, name, "rootfs"), CASRoot: e.cas.Root(),
			ManifestRoot: filepath.Join(e.dir, "manifests"), Layers: layers, ReadOnly: true}
	}
	a := cfg("a")
	stopA := serve(t, a)
	ea, _ := findMount(a.Mountpoint)
	conn := openConn(a.Mountpoint)
	if conn == nil {
		t.Skip("fusectl not available")
	}
	defer conn.Close()
	stopA()
	b := cfg("b")
	serve(t, b)
	eb, _ := findMount(b.Mountpoint)
	t.Logf("connection of a: %d, of b: %d", ea.minor, eb.minor)
	abortConn(conn)
	if got, err := os.ReadFile(filepath.Join(b.Mountpoint, "etc/passwd")); err != nil || string(got) != "root:x:0:0\n" {
		t.Fatalf("b after a late abort of a: %q %v", got, err)
	}
}
