package rootfs

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"math/rand"
	"os"
	"path/filepath"
	"sort"
	"syscall"
	"testing"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

// copyTree copies the tree at src into the plain dir dst with metadata,
// keeping hardlinks (the reference side of the differential test).
func copyTree(t *testing.T, src, dst string) {
	t.Helper()
	links := map[uint64]string{}
	var dirs []string
	err := filepath.Walk(src, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		d := filepath.Join(dst, rel)
		st := fi.Sys().(*syscall.Stat_t)
		switch st.Mode & syscall.S_IFMT {
		case syscall.S_IFDIR:
			if rel != "." {
				if err := os.Mkdir(d, 0o700); err != nil {
					return err
				}
			}
			dirs = append(dirs, rel)
		case syscall.S_IFREG:
			if first, ok := links[st.Ino]; ok {
				return os.Link(first, d)
			}
			links[st.Ino] = d
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			if err := os.WriteFile(d, b, 0o600); err != nil {
				return err
			}
		case syscall.S_IFLNK:
			l, _ := os.Readlink(p)
			if err := os.Symlink(l, d); err != nil {
				return err
			}
		default:
			if err := unix.Mknod(d, st.Mode&syscall.S_IFMT|0o600, int(st.Rdev)); err != nil {
				return err
			}
		}
		os.Lchown(d, int(st.Uid), int(st.Gid))
		if st.Mode&syscall.S_IFMT != syscall.S_IFLNK {
			os.Chmod(d, os.FileMode(st.Mode&0o777)|modeBits(st.Mode))
		}
		buf := make([]byte, 4096)
		if n, _ := unix.Llistxattr(p, buf); n > 0 {
			for _, k := range splitNul(buf[:n]) {
				v := make([]byte, 4096)
				m, err := unix.Lgetxattr(p, k, v)
				if err == nil {
					unix.Lsetxattr(d, k, v[:m], 0)
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("copy %s: %v", src, err)
	}
}

func modeBits(m uint32) os.FileMode {
	var f os.FileMode
	if m&syscall.S_ISUID != 0 {
		f |= os.ModeSetuid
	}
	if m&syscall.S_ISGID != 0 {
		f |= os.ModeSetgid
	}
	if m&syscall.S_ISVTX != 0 {
		f |= os.ModeSticky
	}
	return f
}

func splitNul(b []byte) []string {
	var out []string
	start := 0
	for i, c := range b {
		if c == 0 {
			if i > start {
				out = append(out, string(b[start:i]))
			}
			start = i + 1
		}
	}
	return out
}

func errnoOf(err error) syscall.Errno {
	if err == nil {
		return 0
	}
	var e syscall.Errno
	if errors.As(err, &e) {
		return e
	}
	return syscall.EIO
}

// randomOps applies the same seeded operations to both roots and fails on
// the first differing result.
func randomOps(t *testing.T, seed int64, nops int, roots [2]string) {
	t.Helper()
	rng := rand.New(rand.NewSource(seed))
	var paths, dirs []string
	refresh := func() {
		paths, dirs = paths[:0], []string{""}
		filepath.WalkDir(roots[1], func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return nil
			}
			rel, _ := filepath.Rel(roots[1], p)
			if rel == "." {
				return nil
			}
			paths = append(paths, rel)
			if d.IsDir() {
				dirs = append(dirs, rel)
			}
			return nil
		})
		sort.Strings(paths)
	}
	pick := func() string { return paths[rng.Intn(len(paths))] }
	newName := func() string { return filepath.Join(dirs[rng.Intn(len(dirs))], fmt.Sprintf("n%d", rng.Intn(20))) }
	for i := 0; i < nops; i++ {
		refresh()
		if len(paths) == 0 {
			return
		}
		op := rng.Intn(21)
		a, b := pick(), newName()
		if rng.Intn(3) == 0 {
			b = pick()
		}
		off := rng.Int63n(400000)
		data := make([]byte, 1+rng.Intn(9000))
		rng.Read(data)
		mode := uint32(rng.Intn(0o1000))
		bigName := "big"
		for _, q := range paths {
			if fi, err := os.Lstat(filepath.Join(roots[1], q)); err == nil && fi.Mode().IsRegular() && fi.Size() >= 100000 {
				bigName = q
				if rng.Intn(2) == 0 {
					break
				}
			}
		}
		var desc string
		var errs [2]error
		for k, root := range roots {
			pa, pb := filepath.Join(root, a), filepath.Join(root, b)
			switch op {
			case 0:
				desc = "pwrite " + a
				f, err := os.OpenFile(pa, os.O_WRONLY|syscall.O_NONBLOCK, 0)
				if err == nil {
					_, err = f.WriteAt(data, off%300000)
					f.Close()
				}
				errs[k] = err
			case 1:
				desc = "append " + a
				f, err := os.OpenFile(pa, os.O_WRONLY|os.O_APPEND|syscall.O_NONBLOCK, 0)
				if err == nil {
					_, err = f.Write(data)
					f.Close()
				}
				errs[k] = err
			case 2:
				desc = "truncate " + a
				errs[k] = os.Truncate(pa, off)
			case 3:
				desc = "create " + b
				f, err := os.OpenFile(pb, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o640)
				if err == nil {
					_, err = f.Write(data)
					f.Close()
				}
				errs[k] = err
			case 4:
				desc = "mkdir " + b
				errs[k] = syscall.Mkdir(pb, 0o750)
			case 5:
				desc = "unlink " + a
				errs[k] = syscall.Unlink(pa)
			case 6:
				desc = "rmdir " + a
				errs[k] = syscall.Rmdir(pa)
			case 7, 8:
				desc = "rename " + a + " " + b
				errs[k] = syscall.Rename(pa, pb)
			case 9:
				desc = fmt.Sprintf("chmod %s %o", a, mode)
				errs[k] = syscall.Chmod(pa, mode)
			case 10:
				desc = "chown " + a
				errs[k] = os.Lchown(pa, int(mode), int(mode/2))
			case 11:
				desc = "symlink " + b
				errs[k] = os.Symlink(a, pb)
			case 12:
				desc = "link " + a + " " + b
				errs[k] = os.Link(pa, pb)
			case 13:
				desc = "setxattr " + a
				errs[k] = unix.Lsetxattr(pa, "user.t", data[:8], 0)
			case 14:
				// pwrite deep into a big image file (block CoW, not copy-up)
				desc = "pwrite-big " + bigName
				errs[k] = pwriteFile(filepath.Join(root, bigName), data, off%320000)
			case 15:
				desc = fmt.Sprintf("truncate-extend %s %d", a, off)
				errs[k] = os.Truncate(pa, off/4)
				if errs[k] == nil {
					errs[k] = os.Truncate(pa, off)
				}
			case 16:
				desc = fmt.Sprintf("fallocate %s mode %d", a, mode%3)
				errs[k] = fallocFile(pa, []uint32{0, unix.FALLOC_FL_KEEP_SIZE, unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE}[mode%3], off%200000, int64(len(data)))
			case 17:
				desc = "mmap-write " + a
				errs[k] = mmapWrite(pa, data, off)
			case 18:
				desc = "otrunc-write " + a
				f, err := os.OpenFile(pa, os.O_WRONLY|os.O_TRUNC|syscall.O_NONBLOCK, 0)
				if err == nil {
					_, err = f.Write(data)
					f.Close()
				}
				errs[k] = err
			case 19:
				// hardlink, then write through the new name, then unlink the old
				desc = "link-write-unlink " + a + " " + b
				err := os.Link(pa, pb)
				if err == nil {
					err = pwriteFile(pb, data, off%5000)
				}
				if err == nil {
					err = syscall.Unlink(pa)
				}
				errs[k] = err
			case 20:
				// modify, then rename over another name
				desc = "write-rename " + a + " " + b
				err := pwriteFile(pa, data, off%5000)
				if err == nil {
					err = syscall.Rename(pa, pb)
				}
				errs[k] = err
			}
		}
		if errnoOf(errs[0]) != errnoOf(errs[1]) {
			t.Fatalf("seed %d op %d %s: rootfs %v, plain %v", seed, i, desc, errs[0], errs[1])
		}
		if os.Getenv("DUPSNAP_DEBUG_OPS") != "" {
			t.Logf("op %d %s: %v %v", i, desc, errs[0], errs[1])
			for _, q := range paths {
				x, _ := os.Lstat(filepath.Join(roots[0], q))
				y, _ := os.Lstat(filepath.Join(roots[1], q))
				if x != nil && y != nil && x.Size() != y.Size() && x.Mode().IsRegular() {
					t.Fatalf("seed %d op %d %s: size of %s %d vs %d", seed, i, desc, q, x.Size(), y.Size())
				}
			}
		}
	}
}

func pwriteFile(p string, data []byte, off int64) error {
	f, err := os.OpenFile(p, os.O_WRONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = f.WriteAt(data, off)
	return err
}

func fallocFile(p string, mode uint32, off, n int64) error {
	f, err := os.OpenFile(p, os.O_WRONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	return unix.Fallocate(int(f.Fd()), mode, off, n)
}

// mmapWrite writes data through a MAP_SHARED mapping of regular file p
// (inside its current size) and msyncs it.
func mmapWrite(p string, data []byte, off int64) error {
	f, err := os.OpenFile(p, os.O_RDWR|syscall.O_NONBLOCK, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() || fi.Size() == 0 {
		return nil
	}
	m, err := unix.Mmap(int(f.Fd()), 0, int(fi.Size()), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return err
	}
	defer unix.Munmap(m)
	copy(m[off%int64(len(m)):], data)
	return unix.Msync(m, unix.MS_SYNC)
}

func TestActiveDifferential(t *testing.T) {
	needRoot(t)
	e := newEnv(t)
	layers := baseLayers(t, e)
	mp := filepath.Join(e.dir, "active", "rootfs")
	cfg := Config{Mountpoint: mp, CASRoot: e.cas.Root(), ManifestRoot: filepath.Join(e.dir, "manifests"),
		Layers: layers, StateDir: filepath.Join(e.dir, "active", "state")}
	stop := serveProc(t, cfg) // randomOps mmaps: see serveProc
	plain := filepath.Join(e.dir, "plain")
	os.Mkdir(plain, 0o755)
	copyTree(t, mp, plain)
	compareTrees(t, "initial", mp, plain)

	for seed := int64(1); seed <= 4; seed++ {
		randomOps(t, seed, 150, [2]string{mp, plain})
		compareTrees(t, fmt.Sprintf("after seed %d", seed), mp, plain)
		if t.Failed() {
			return
		}
	}
	// Renames of image dirs, unlink of image files, over hardlinks.
	for _, op := range [][2]string{{"tree", "moved"}, {"moved/sub", "sub2"}} {
		if err := os.Rename(filepath.Join(mp, op[0]), filepath.Join(mp, op[1])); err != nil {
			if err2 := os.Rename(filepath.Join(plain, op[0]), filepath.Join(plain, op[1])); errnoOf(err) != errnoOf(err2) {
				t.Fatalf("rename %v: %v vs %v", op, err, err2)
			}
			continue
		}
		if err := os.Rename(filepath.Join(plain, op[0]), filepath.Join(plain, op[1])); err != nil {
			t.Fatalf("plain rename %v: %v", op, err)
		}
	}
	compareTrees(t, "after dir renames", mp, plain)

	stop()
	serveProc(t, cfg)
	compareTrees(t, "after restart", mp, plain)

	b := e.cas.NewBatch()
	m, err := Changes(context.Background(), cfg, b)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Commit(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := e.ms.Put(context.Background(), m); err != nil {
		t.Fatal(err)
	}
	whiteouts := 0
	for _, en := range m.Entries {
		if en.Whiteout {
			whiteouts++
		}
	}
	t.Logf("changes: %d entries, %d whiteouts", len(m.Entries), whiteouts)
	vmp := filepath.Join(e.dir, "committed", "rootfs")
	serve(t, Config{Mountpoint: vmp, CASRoot: e.cas.Root(), ManifestRoot: filepath.Join(e.dir, "manifests"),
		Layers: append(append([]digest.Digest(nil), layers...), m.DiffID), ReadOnly: true})
	compareTrees(t, "committed layer", vmp, plain)
}
