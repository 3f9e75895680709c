package rootfs

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// Files created through the placeholder pool (inodes made ahead, renamed
// into place) and in place get the caller's ids, the dir's group under a
// setgid dir, the asked mode (special bits too), a fresh mtime, and keep
// all of it and their data across a restart; the pool leaves nothing in
// the work dir when the server stops.
func TestCreateOwnerModeTimes(t *testing.T) {
	needRoot(t)
	e := newEnv(t)
	cfg := activeCfg(e, baseLayers(t, e))
	stop := serve(t, cfg)
	mp := cfg.Mountpoint
	// The first create starts the pool; let it fill and age.
	if err := os.WriteFile(filepath.Join(mp, "first"), []byte("1"), 0o644); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1100 * time.Millisecond)
	if err := os.Mkdir(filepath.Join(mp, "sg"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(filepath.Join(mp, "sg"), 0, 1234); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Chmod(filepath.Join(mp, "sg"), 0o2777); err != nil {
		t.Fatal(err)
	}
	before := time.Now().Add(-10 * time.Millisecond)
	type want struct {
		mode     uint32
		uid, gid uint32
	}
	wants := map[string]want{}
	create := func(name string, mode os.FileMode) {
		t.Helper()
		f, err := os.OpenFile(filepath.Join(mp, name), os.O_RDWR|os.O_CREATE|os.O_EXCL, mode)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.Write([]byte(name)); err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	syscall.Umask(0) // so the modes asked arrive as they are
	defer syscall.Umask(0o22)
	create("a644", 0o644)
	wants["a644"] = want{0o644, 0, 0}
	create("a600", 0o600)
	wants["a600"] = want{0o600, 0, 0}
	create("a4755", 0o755|os.ModeSetuid)
	if err := syscall.Chmod(filepath.Join(mp, "a4755"), 0o4755); err != nil {
		t.Fatal(err)
	}
	wants["a4755"] = want{0o4755, 0, 0}
	create("sg/root", 0o640)
	wants["sg/root"] = want{0o640, 0, 1234}
	// A non-root caller: a shell running as 1000:1000.
	cmd := exec.CommandContext(context.Background(), "/bin/sh", "-c", "umask 022; echo user > sg/user; echo user > user")
	cmd.Dir = mp
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 1000, Gid: 1000}}
	os.Chmod(mp, 0o777)
	for d := filepath.Dir(mp); d != "/" && d != os.TempDir(); d = filepath.Dir(d) {
		os.Chmod(d, 0o755) // let uid 1000 reach the mount
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("create as 1000: %v %s", err, out)
	}
	wants["sg/user"] = want{0o644, 1000, 1234}
	wants["user"] = want{0o644, 1000, 1000}
	check := func(when string) {
		t.Helper()
		for name, w := range wants {
			var st syscall.Stat_t
			if err := syscall.Stat(filepath.Join(mp, name), &st); err != nil {
				t.Fatalf("%s: %v", when, err)
			}
			if st.Mode&07777 != w.mode || st.Uid != w.uid || st.Gid != w.gid {
				t.Errorf("%s: %s: mode %o %d:%d, want %o %d:%d", when, name, st.Mode&07777, st.Uid, st.Gid, w.mode, w.uid, w.gid)
			}
			if mt := time.Unix(st.Mtim.Unix()); mt.Before(before) {
				t.Errorf("%s: %s: mtime %v is before its create (%v)", when, name, mt, before)
			}
			b, err := os.ReadFile(filepath.Join(mp, name))
			wantData := []byte(name)
			if filepath.Base(name) == "user" {
				wantData = []byte("user\n")
			}
			if err != nil || !bytes.Equal(b, wantData) {
				t.Errorf("%s: %s: content %q %v", when, name, b, err)
			}
		}
	}
	check("served")
	stop()
	if ents, _ := os.ReadDir(cfg.workDir()); len(ents) != 0 {
		t.Errorf("work dir holds %d entries after stop (first %s)", len(ents), ents[0].Name())
	}
	serve(t, cfg)
	check("after restart")
}
