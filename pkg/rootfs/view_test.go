package rootfs

import (
	"archive/tar"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

// baseLayers is a two-layer image exercising whiteouts, opaque dirs,
// hardlinks, devices, xattrs and replaced files.
func baseLayers(t *testing.T, e *env) []digest.Digest {
	l1 := makeTar(t, []tarEntry{
		{name: "etc/", typ: tar.TypeDir},
		{name: "etc/passwd", body: "root:x:0:0\n"},
		{name: "etc/replaced", body: "old"},
		{name: "bin/", typ: tar.TypeDir},
		{name: "bin/tool", body: "#!/bin/sh\necho hi\n", mode: 0o4755, uid: 12, gid: 34,
			xattrs: map[string]string{"security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"}},
		{name: "bin/tool-link", typ: tar.TypeLink, link: "bin/tool"},
		{name: "bin/sh", typ: tar.TypeSymlink, link: "tool"},
		{name: "dev/", typ: tar.TypeDir},
		{name: "dev/null", typ: tar.TypeChar, major: 1, minor: 3, mode: 0o666},
		{name: "dev/fifo", typ: tar.TypeFifo},
		{name: "gone", body: "deleted by layer 2"},
		{name: "opq/", typ: tar.TypeDir},
		{name: "opq/hidden", body: "hidden"},
		{name: "tree/", typ: tar.TypeDir},
		{name: "tree/sub/", typ: tar.TypeDir},
		{name: "tree/sub/a", body: "aaaa"},
		{name: "tree/sub/b", body: "bbbb"},
		{name: "tree/link-b", typ: tar.TypeLink, link: "tree/sub/b"},
		{name: "big", body: string(make([]byte, 300000))},
		{name: "empty", body: ""},
	})
	l2 := makeTar(t, []tarEntry{
		{name: ".wh.gone"},
		{name: "opq/", typ: tar.TypeDir},
		{name: "opq/.wh..wh..opq"},
		{name: "opq/new", body: "new"},
		{name: "etc/replaced", body: "new content", mode: 0o600},
	})
	return []digest.Digest{e.addLayer(t, l1), e.addLayer(t, l2)}
}

func TestView(t *testing.T) {
	needRoot(t)
	e := newEnv(t)
	layers := baseLayers(t, e)
	mp := filepath.Join(e.dir, "view", "rootfs")
	serve(t, Config{Mountpoint: mp, CASRoot: e.cas.Root(), ManifestRoot: filepath.Join(e.dir, "manifests"), Layers: layers, ReadOnly: true})

	read := func(p string) string {
		b, err := os.ReadFile(filepath.Join(mp, p))
		if err != nil {
			t.Fatalf("read %s: %v", p, err)
		}
		return string(b)
	}
	if got := read("etc/passwd"); got != "root:x:0:0\n" {
		t.Errorf("passwd = %q", got)
	}
	if got := read("etc/replaced"); got != "new content" {
		t.Errorf("replaced = %q", got)
	}
	if got := read("bin/sh"); got != "#!/bin/sh\necho hi\n" {
		t.Errorf("symlink target content = %q", got)
	}
	if len(read("big")) != 300000 || read("empty") != "" {
		t.Errorf("big/empty sizes wrong")
	}
	for _, p := range []string{"gone", "opq/hidden"} {
		if _, err := os.Lstat(filepath.Join(mp, p)); !os.IsNotExist(err) {
			t.Errorf("%s: want ENOENT, got %v", p, err)
		}
	}
	if read("opq/new") != "new" {
		t.Errorf("opq/new missing")
	}
	var st, st2 syscall.Stat_t
	if err := syscall.Lstat(filepath.Join(mp, "bin/tool"), &st); err != nil {
		t.Fatal(err)
	}
	if st.Mode != syscall.S_IFREG|0o4755 || st.Uid != 12 || st.Gid != 34 || st.Nlink != 2 || st.Mtim.Sec != testTime.Unix() {
		t.Errorf("bin/tool stat: mode %o uid %d gid %d nlink %d mtime %d", st.Mode, st.Uid, st.Gid, st.Nlink, st.Mtim.Sec)
	}
	syscall.Lstat(filepath.Join(mp, "bin/tool-link"), &st2)
	if st.Ino != st2.Ino {
		t.Errorf("hardlinks have inodes %d and %d", st.Ino, st2.Ino)
	}
	capb := make([]byte, 64)
	if n, err := unix.Lgetxattr(filepath.Join(mp, "bin/tool"), "security.capability", capb); err != nil || n != 20 {
		t.Errorf("security.capability: %d %v", n, err)
	}
	if err := syscall.Lstat(filepath.Join(mp, "dev/null"), &st); err != nil || st.Mode&syscall.S_IFMT != syscall.S_IFCHR || st.Rdev != unix.Mkdev(1, 3) {
		t.Errorf("dev/null: mode %o rdev %x err %v", st.Mode, st.Rdev, err)
	}
	if err := syscall.Lstat(filepath.Join(mp, "dev/fifo"), &st); err != nil || st.Mode&syscall.S_IFMT != syscall.S_IFIFO {
		t.Errorf("dev/fifo: mode %o err %v", st.Mode, err)
	}
	ents, err := os.ReadDir(mp)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, d := range ents {
		names = append(names, d.Name())
	}
	if want := "[big bin dev empty etc opq tree]"; fmtList(names) != want {
		t.Errorf("root listing %v, want %s", names, want)
	}
	// Views refuse every write.
	if err := os.WriteFile(filepath.Join(mp, "x"), nil, 0o644); !isErrno(err, syscall.EROFS) {
		t.Errorf("create: %v", err)
	}
	if _, err := os.OpenFile(filepath.Join(mp, "etc/passwd"), os.O_WRONLY, 0); !isErrno(err, syscall.EROFS) {
		t.Errorf("open for write: %v", err)
	}
	if err := os.Remove(filepath.Join(mp, "etc/passwd")); !isErrno(err, syscall.EROFS) {
		t.Errorf("unlink: %v", err)
	}
	if err := os.Chmod(filepath.Join(mp, "etc/passwd"), 0o600); !isErrno(err, syscall.EROFS) {
		t.Errorf("chmod: %v", err)
	}
	var sfs syscall.Statfs_t
	if err := syscall.Statfs(mp, &sfs); err != nil || sfs.Blocks == 0 {
		t.Errorf("statfs: %+v %v", sfs, err)
	}
}

func fmtList(s []string) string { return fmtAny(s) }
