package rootfs

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

// fakeCap is a well-formed VFS_CAP_REVISION_2 security.capability value
// (cap_net_bind_service=ep).
var fakeCap = string([]byte{0x01, 0x00, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0})

// Writes, truncates and O_TRUNC opens drop setuid, setgid (with group
// execute) and security.capability as on the host fs: suid/sgid only for a
// caller without CAP_FSETID, the capability for anyone. Checked side by
// side with a plain directory of the host fs, for image files (the first
// write copies up) and files the container made: region files, and plain
// upper files written through passthrough (PlainNewFiles).
func TestKillPrivOnWrite(t *testing.T) {
	needRoot(t)
	for _, plain := range []bool{false, true} {
		t.Run(map[bool]string{false: "region", true: "plain"}[plain], func(t *testing.T) { testKillPriv(t, plain) })
	}
}

func testKillPriv(t *testing.T, plain bool) {
	e := newEnv(t)
	modes := map[string]uint32{"suid": 0o4777, "sgidx": 0o2777, "sgid": 0o2767, "cap": 0o777}
	ents := []tarEntry{{name: "img/", typ: '5', mode: 0o777}}
	for n, m := range modes {
		ents = append(ents, tarEntry{name: "img/" + n, body: "image", mode: int64(m)})
	}
	cfg := activeCfg(e, []digest.Digest{e.addLayer(t, makeTar(t, ents))})
	cfg.PlainNewFiles = plain
	serve(t, cfg)
	ref := t.TempDir()
	// The user the script runs as must reach both trees.
	for _, p := range []string{cfg.Mountpoint, ref} {
		for d := filepath.Dir(p); len(d) > len(os.TempDir()); d = filepath.Dir(d) {
			os.Chmod(d, 0o755)
		}
	}
	for _, root := range []string{cfg.Mountpoint, ref} {
		for _, d := range []string{"img", "new"} {
			if err := os.MkdirAll(filepath.Join(root, d), 0o777); err != nil {
				t.Fatal(err)
			}
			os.Chmod(filepath.Join(root, d), 0o777)
		}
		for n := range modes {
			if root == ref {
				os.WriteFile(filepath.Join(root, "img", n), []byte("image"), 0o600)
			}
			os.WriteFile(filepath.Join(root, "new", n), []byte("new"), 0o600)
		}
	}
	// reset puts the mode (and the capability) back before each operation.
	reset := func(p, n string) {
		if err := os.Chmod(p, os.FileMode(modes[n]&0o777)|modeBits(modes[n])); err != nil {
			t.Fatal(err)
		}
		if n == "cap" {
			if err := unix.Setxattr(p, "security.capability", []byte(fakeCap), 0); err != nil {
				t.Fatalf("setxattr %s: %v", p, err)
			}
		}
	}
	// The user is in the files' group (gid 0, no capabilities): Linux's
	// FUSE keeps setgid without group execute on a write (fuse_setattr),
	// where ext4 also drops it for a caller outside the file's group.
	run := func(uid int, script, p string) {
		cmd := exec.Command("/bin/sh", "-c", script, "sh", p)
		if uid != 0 {
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: 0}}
		}
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%s on %s as %d: %v: %s", script, p, uid, err, out)
		}
	}
	state := func(p string) (uint32, bool) {
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			t.Fatal(err)
		}
		_, err := unix.Getxattr(p, "security.capability", make([]byte, 64))
		return st.Mode & 0o7777, err == nil
	}
	ops := []struct {
		what, script string
		uid          int
	}{
		{"append by a user", `printf x >> "$1"`, 1000},
		{"write by root", `printf y >> "$1"`, 0},
		{"truncate by a user", `truncate -s 2 "$1"`, 1000},
		{"O_TRUNC open by a user", `printf z > "$1"`, 1000},
		{"O_TRUNC open by root", `printf w > "$1"`, 0},
		{"second append by a user", `printf v >> "$1"`, 1000},
	}
	for _, op := range ops {
		for _, d := range []string{"img", "new"} {
			for n := range modes {
				rel := filepath.Join(d, n)
				got, want := filepath.Join(cfg.Mountpoint, rel), filepath.Join(ref, rel)
				for _, p := range []string{got, want} {
					reset(p, n)
					run(op.uid, op.script, p)
				}
				gm, gc := state(got)
				wm, wc := state(want)
				if gm != wm || gc != wc {
					t.Errorf("%s, %s: mode %04o, capability %v; the host fs gives %04o, %v", op.what, rel, gm, gc, wm, wc)
				}
				gb, _ := os.ReadFile(got)
				wb, _ := os.ReadFile(want)
				if d == "new" && !bytes.Equal(gb, wb) {
					t.Errorf("%s, %s: content %q, want %q", op.what, rel, gb, wb)
				}
			}
		}
	}
}
