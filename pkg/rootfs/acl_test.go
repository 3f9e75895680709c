package rootfs

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

// posixACL encodes a POSIX ACL xattr value (version 2): owner rwx, a
// named user uid rwx, group r-x, mask rwx, other r-x.
func posixACL(uid uint32) []byte {
	type ent struct {
		tag, perm uint16
		id        uint32
	}
	const undef = 0xffffffff
	ents := []ent{{0x01, 7, undef}, {0x02, 7, uid}, {0x04, 5, undef}, {0x10, 7, undef}, {0x20, 5, undef}}
	b := binary.LittleEndian.AppendUint32(nil, 2)
	for _, e := range ents {
		b = binary.LittleEndian.AppendUint16(b, e.tag)
		b = binary.LittleEndian.AppendUint16(b, e.perm)
		b = binary.LittleEndian.AppendUint32(b, e.id)
	}
	return b
}

// A file created in a dir with a default ACL inherits it, as in
// overlayfs's upper dir: the create must not take a pooled inode (made in
// the upper root, without the ACL).
func TestCreateInheritsDefaultACL(t *testing.T) {
	needRoot(t)
	e := newEnv(t)
	l := e.addLayer(t, makeTar(t, []tarEntry{{name: "etc/", typ: '5'}}))
	cfg := activeCfg(e, []digest.Digest{l})
	var r *rootFS
	cfg.onFS = func(fs *rootFS) { r = fs }
	serve(t, cfg)
	d := filepath.Join(cfg.Mountpoint, "shared")
	if err := os.Mkdir(d, 0o775); err != nil {
		t.Fatal(err)
	}
	if err := unix.Setxattr(d, "system.posix_acl_default", posixACL(4242), 0); err != nil {
		t.Skipf("no POSIX ACLs here: %v", err)
	}
	// Warm the placeholder pool first: creates elsewhere use it.
	for i := 0; i < 3; i++ {
		if err := os.WriteFile(filepath.Join(cfg.Mountpoint, "etc", "f"+string(rune('a'+i))), []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	pooled := func() int {
		r.ph.mu.Lock()
		defer r.ph.mu.Unlock()
		return len(r.ph.ready)
	}
	for deadline := time.Now().Add(5 * time.Second); pooled() == 0; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the placeholder pool never filled")
		}
	}
	p := filepath.Join(d, "file")
	if err := os.WriteFile(p, []byte("data"), 0o664); err != nil {
		t.Fatal(err)
	}
	sz, err := unix.Getxattr(p, "system.posix_acl_access", nil)
	if err != nil || sz == 0 {
		t.Fatalf("new file in a dir with a default ACL has no ACL (size %d, %v)", sz, err)
	}
	if b, err := os.ReadFile(p); err != nil || string(b) != "data" {
		t.Fatalf("content %q, %v", b, err)
	}
}
