package rootfs

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// Region files are opened with FOPEN_KEEP_CACHE on a mount with explicit
// data cache control: the kernel keeps their pages across opens and never
// drops them on its own when mtime or size move. That is only correct if
// every change of their data reaches the kernel's cache. TestCowPageCache
// fills the cache of a modified image file and of a new file, changes them
// every way a container can (another descriptor, another name, mmap,
// truncate with and without a descriptor, fallocate, O_TRUNC,
// copy_file_range, rename over), and after each change reads the whole
// file through a descriptor opened before the change (its cached pages)
// and through a new one, against a model of the content.
func TestCowPageCache(t *testing.T) {
	needRoot(t)
	const size = 1 << 20
	e, layers, body := bigImage(t, size)
	cfg := activeCfg(e, layers)
	serveProc(t, cfg) // mmaps: see serveProc
	mp := cfg.Mountpoint

	for _, name := range []string{"big", "new"} {
		t.Run(name, func(t *testing.T) {
			p := filepath.Join(mp, name)
			model := []byte(body)
			if name == "new" {
				model = bytes.Repeat([]byte("n"), size)
				if err := os.WriteFile(p, model, 0o644); err != nil {
					t.Fatal(err)
				}
			} else if err := pwriteFile(p, []byte("first write: now a region file"), 3*4096+7); err != nil {
				t.Fatal(err)
			} else {
				copy(model[3*4096+7:], "first write: now a region file")
			}
			// old is opened (and its pages read) before every change.
			old, err := os.Open(p)
			if err != nil {
				t.Fatal(err)
			}
			defer old.Close()
			check := func(what string) {
				t.Helper()
				got := make([]byte, len(model)+4096)
				n, _ := old.ReadAt(got, 0)
				if !bytes.Equal(got[:n], model) {
					t.Fatalf("%s: descriptor opened before: %s", what, firstDiff(got[:n], model))
				}
				b, err := os.ReadFile(p)
				if err != nil || !bytes.Equal(b, model) {
					t.Fatalf("%s: new open: %v %s", what, err, firstDiff(b, model))
				}
				st, err := os.Stat(p)
				if err != nil || st.Size() != int64(len(model)) {
					t.Fatalf("%s: stat size %v, want %d (%v)", what, st.Size(), len(model), err)
				}
			}
			write := func(b []byte, off int64) {
				if end := off + int64(len(b)); end > int64(len(model)) {
					model = append(model, make([]byte, end-int64(len(model)))...)
				}
				copy(model[off:], b)
			}
			resize := func(n int64) {
				if n < int64(len(model)) {
					model = model[:n]
				} else {
					model = append(model, make([]byte, n-int64(len(model)))...)
				}
			}
			check("cached")

			// Another descriptor, unaligned, over two pages.
			if err := pwriteFile(p, []byte("other fd"), 8*4096-3); err != nil {
				t.Fatal(err)
			}
			write([]byte("other fd"), 8*4096-3)
			check("write through another descriptor")

			// Another name of the same inode.
			link := p + ".link"
			if err := os.Link(p, link); err != nil {
				t.Fatal(err)
			}
			if err := pwriteFile(link, []byte("via link"), 100); err != nil {
				t.Fatal(err)
			}
			write([]byte("via link"), 100)
			check("write through a hard link")
			os.Remove(link)

			// mmap MAP_SHARED writes, and a write(2) seen through the mapping.
			f, err := os.OpenFile(p, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			m, err := unix.Mmap(int(f.Fd()), 0, 16*4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
			if err != nil {
				t.Fatal(err)
			}
			copy(m[5*4096+1:], "mmap write")
			write([]byte("mmap write"), 5*4096+1)
			if err := unix.Msync(m, unix.MS_SYNC); err != nil {
				t.Fatal(err)
			}
			check("MAP_SHARED write")
			if _, err := f.WriteAt([]byte("pwrite"), 6*4096); err != nil {
				t.Fatal(err)
			}
			write([]byte("pwrite"), 6*4096)
			if string(m[6*4096:6*4096+6]) != "pwrite" {
				t.Fatalf("mapping does not see a write(2): %q", m[6*4096:6*4096+6])
			}
			unix.Munmap(m)
			check("write while mapped")

			// ftruncate down and up again: the tail reads as zeros.
			if err := f.Truncate(10*4096 + 5); err != nil {
				t.Fatal(err)
			}
			resize(10*4096 + 5)
			check("ftruncate down")
			if err := f.Truncate(size); err != nil {
				t.Fatal(err)
			}
			resize(size)
			check("ftruncate up")
			// truncate(2) by name, no descriptor of the caller.
			if err := os.Truncate(p, 3*4096); err != nil {
				t.Fatal(err)
			}
			resize(3 * 4096)
			if err := os.Truncate(p, 64<<10); err != nil {
				t.Fatal(err)
			}
			resize(64 << 10)
			check("truncate by name")
			if _, err := f.WriteAt(bytes.Repeat([]byte("w"), 64<<10), 0); err != nil {
				t.Fatal(err)
			}
			write(bytes.Repeat([]byte("w"), 64<<10), 0)

			// fallocate: punch a hole, zero a range, extend.
			if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 4096+10, 3*4096); err != nil {
				t.Fatal(err)
			}
			write(make([]byte, 3*4096), 4096+10)
			check("punch hole")
			if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_ZERO_RANGE, 9*4096-1, 2*4096); err != nil {
				if err != syscall.EOPNOTSUPP {
					t.Fatal(err)
				}
			} else {
				write(make([]byte, 2*4096), 9*4096-1)
				check("zero range")
			}
			if err := unix.Fallocate(int(f.Fd()), 0, 0, 100<<10); err != nil {
				t.Fatal(err)
			}
			resize(100 << 10)
			check("fallocate extend")

			// copy_file_range from another file into this one.
			src := filepath.Join(mp, "small")
			sf, err := os.Open(src)
			if err != nil {
				t.Fatal(err)
			}
			roff, woff := int64(0), int64(2*4096+100)
			k, err := unix.CopyFileRange(int(sf.Fd()), &roff, int(f.Fd()), &woff, 10, 0)
			sf.Close()
			if err != nil || k != 10 {
				t.Fatalf("copy_file_range: %d %v", k, err)
			}
			write([]byte("small file"), 2*4096+100)
			check("copy_file_range")
			f.Close()

			// O_TRUNC open, then new content.
			g, err := os.OpenFile(p, os.O_WRONLY|os.O_TRUNC, 0)
			if err != nil {
				t.Fatal(err)
			}
			resize(0)
			check("O_TRUNC")
			if _, err := g.Write([]byte("after O_TRUNC")); err != nil {
				t.Fatal(err)
			}
			g.Close()
			write([]byte("after O_TRUNC"), 0)
			check("write after O_TRUNC")
		})
	}

	// Rename a modified file over another one whose pages are cached: the
	// name shows the new file's content (the old descriptor keeps its own).
	a, b := filepath.Join(mp, "big"), filepath.Join(mp, "new")
	want, err := os.ReadFile(b)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.ReadFile(a); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(b, a); err != nil {
		t.Fatal(err)
	}
	if got, err := os.ReadFile(a); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("after rename over: %v %s", err, firstDiff(got, want))
	}
}

func firstDiff(got, want []byte) string {
	for i := 0; i < len(got) && i < len(want); i++ {
		if got[i] != want[i] {
			end := min(i+16, len(got), len(want))
			return fmt.Sprintf("first difference at %d: got %q want %q", i, got[i:end], want[i:end])
		}
	}
	return fmt.Sprintf("length %d, want %d", len(got), len(want))
}
