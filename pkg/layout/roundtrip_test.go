package layout

import (
	"archive/tar"
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// makeTree builds a directory exercising what layers contain. full adds
// what only gnu/posix formats can hold (long names, devices, xattrs).
func makeTree(t *testing.T, full bool) string {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "etc/hostname"), []byte("box\n"), 0o644)
	writeFile(t, filepath.Join(dir, "etc/empty"), nil, 0o600)
	writeFile(t, filepath.Join(dir, "bin/tool"), pseudoRandom(1, 70000), 0o4755)
	writeFile(t, filepath.Join(dir, "usr/lib/big"), pseudoRandom(2, 1<<20+13), 0o644)
	writeFile(t, filepath.Join(dir, "usr/lib/dup"), pseudoRandom(2, 1<<20+13), 0o644)
	must(t, os.Link(filepath.Join(dir, "bin/tool"), filepath.Join(dir, "bin/tool-link")))
	must(t, os.Symlink("../etc/hostname", filepath.Join(dir, "bin/host")))
	must(t, os.MkdirAll(filepath.Join(dir, "var/empty"), 0o1777))
	if full {
		long := strings.Repeat("long-directory-name/", 8) + strings.Repeat("f", 120)
		writeFile(t, filepath.Join(dir, long), []byte("long name\n"), 0o644)
		must(t, os.Symlink(strings.Repeat("target/", 30)+"x", filepath.Join(dir, "longlink")))
		must(t, os.Link(filepath.Join(dir, long), filepath.Join(dir, "hardlink-to-long")))
		must(t, unix.Mkfifo(filepath.Join(dir, "fifo"), 0o644))
		mknod(t, filepath.Join(dir, "null"), unix.S_IFCHR|0o666, 1, 3)
		mknod(t, filepath.Join(dir, "loop9"), unix.S_IFBLK|0o660, 7, 9)
		must(t, unix.Lsetxattr(filepath.Join(dir, "etc/hostname"), "user.comment", []byte("hello"), 0))
		must(t, unix.Lsetxattr(filepath.Join(dir, "bin/tool"), "security.capability",
			[]byte{1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, 0))
		// A sparse file: data islands in a large hole.
		f, err := os.Create(filepath.Join(dir, "sparse.img"))
		must(t, err)
		must(t, f.Truncate(8<<20))
		f.WriteAt(pseudoRandom(3, 5000), 4096)
		f.WriteAt(pseudoRandom(4, 3000), 5<<20)
		f.Close()
	}
	when := time.Unix(1700000000, 0)
	filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err == nil {
			unix.Lutimes(p, []unix.Timeval{unix.NsecToTimeval(when.UnixNano()), unix.NsecToTimeval(when.UnixNano())})
		}
		return nil
	})
	return dir
}

func TestRoundTripGNUTar(t *testing.T) {
	full := makeTree(t, true)
	basic := makeTree(t, false)
	cases := []struct {
		name string
		dir  string
		args []string
	}{
		{"gnu", full, []string{"--format=gnu", "--sparse"}},
		{"oldgnu", full, []string{"--format=oldgnu", "--sparse"}},
		{"posix-xattrs", full, []string{"--format=posix", "--xattrs", "--xattrs-include=*"}},
		{"posix-sparse-0.0", full, []string{"--format=posix", "--sparse", "--sparse-version=0.0"}},
		{"posix-sparse-0.1", full, []string{"--format=posix", "--sparse", "--sparse-version=0.1"}},
		{"posix-sparse-1.0", full, []string{"--format=posix", "--sparse", "--sparse-version=1.0", "--xattrs"}},
		{"ustar", basic, []string{"--format=ustar"}},
		{"v7", basic, []string{"--format=v7"}},
		{"dot-prefix-blocking", basic, []string{"--format=gnu", "--blocking-factor=7"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			args := append([]string{"-c", "-f", "-", "--numeric-owner"}, c.args...)
			args = append(args, ".")
			plain := run(t, c.dir, "tar", args...)
			for _, enc := range encodings {
				t.Run(enc.name, func(t *testing.T) {
					m := roundTrip(t, enc.enc(t, plain), plain)
					if strings.Contains(strings.Join(c.args, " "), "--sparse") {
						checkSparse(t, m)
					}
					checkTreeEntries(t, m, c.dir, strings.HasPrefix(c.name, "posix") && strings.Contains(strings.Join(c.args, " "), "xattrs"))
				})
			}
		})
	}
}

// checkSparse: the sparse file was archived sparse (only its fragments),
// and that archived form is an object of its own, kept by Objects().
func checkSparse(t *testing.T, m *Manifest) {
	t.Helper()
	for i, e := range m.Entries {
		if e.Path != "sparse.img" {
			continue
		}
		seg := m.raw.segs[i]
		if seg.payDigest == "" || seg.paySize >= e.Size || seg.paySize < 8000 {
			t.Fatalf("sparse.img: archived %d bytes (%q) for size %d", seg.paySize, seg.payDigest, e.Size)
		}
		objs := m.Objects()
		if !slices.Contains(objs, seg.payDigest) || !slices.Contains(objs, e.Digest) {
			t.Fatal("Objects() lacks the sparse file's objects")
		}
		return
	}
	t.Fatal("no sparse.img entry")
}

// checkTreeEntries compares manifest entries with the files they came from.
func checkTreeEntries(t *testing.T, m *Manifest, dir string, xattrs bool) {
	t.Helper()
	files := 0
	for _, e := range m.Entries {
		var st unix.Stat_t
		if err := unix.Lstat(filepath.Join(dir, e.Path), &st); err != nil {
			t.Fatalf("entry %q: %v", e.Path, err)
		}
		if e.Type != TypeHardlink && e.Mode != st.Mode&07777 {
			t.Errorf("%q mode %o want %o", e.Path, e.Mode, st.Mode&07777)
		}
		switch e.Type {
		case TypeFile:
			files++
			data, err := os.ReadFile(filepath.Join(dir, e.Path))
			must(t, err)
			if e.Digest != sha(data) || e.Size != int64(len(data)) {
				t.Errorf("%q content digest %s size %d, want %s %d", e.Path, e.Digest, e.Size, sha(data), len(data))
			}
		case TypeChar, TypeBlock:
			if e.Devmajor != unix.Major(uint64(st.Rdev)) || e.Devminor != unix.Minor(uint64(st.Rdev)) {
				t.Errorf("%q device %d,%d", e.Path, e.Devmajor, e.Devminor)
			}
		case TypeSymlink:
			target, _ := os.Readlink(filepath.Join(dir, e.Path))
			if e.Linkname != target {
				t.Errorf("%q target %q want %q", e.Path, e.Linkname, target)
			}
		case TypeHardlink:
			if e.Linkname == "" || e.Linkname == e.Path {
				t.Errorf("%q bad hardlink target %q", e.Path, e.Linkname)
			}
		}
		if e.Path != "." && !e.ModTime.Equal(time.Unix(1700000000, 0)) {
			t.Errorf("%q mtime %v", e.Path, e.ModTime)
		}
	}
	if files < 4 {
		t.Errorf("only %d files in manifest", files)
	}
	if xattrs {
		e := entryByPath(m, "etc/hostname")
		if e == nil || e.Xattrs["user.comment"] != "hello" {
			t.Errorf("xattr of etc/hostname not recorded: %+v", e)
		}
		// bin/tool and bin/tool-link are one inode; tar archives it once.
		e = entryByPath(m, "bin/tool")
		if e != nil && e.Type == TypeHardlink {
			e = entryByPath(m, e.Linkname)
		} else if e == nil || e.Type != TypeFile {
			e = entryByPath(m, "bin/tool-link")
		}
		if e == nil || len(e.Xattrs["security.capability"]) != 20 {
			t.Errorf("capability of bin/tool not recorded: %+v", e)
		}
	}
}

func TestRoundTripGoTar(t *testing.T) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	add := func(h *tar.Header, data []byte) {
		must(t, tw.WriteHeader(h))
		if len(data) > 0 {
			_, err := tw.Write(data)
			must(t, err)
		}
	}
	now := time.Unix(1650000000, 123456789)
	add(&tar.Header{Typeflag: tar.TypeDir, Name: "./", Mode: 0o755, ModTime: now}, nil)
	add(&tar.Header{Typeflag: tar.TypeDir, Name: "a/", Mode: 0o755, ModTime: now, Format: tar.FormatPAX, AccessTime: now, ChangeTime: now}, nil)
	add(&tar.Header{Typeflag: tar.TypeReg, Name: "a/f", Mode: 0o644, Size: 5, ModTime: now, Uname: "root", Gname: "root"}, []byte("hello"))
	add(&tar.Header{Typeflag: tar.TypeReg, Name: "a/f", Mode: 0o600, Size: 3, ModTime: now}, []byte("dup")) // duplicate path
	add(&tar.Header{Typeflag: tar.TypeReg, Name: "a/.wh.gone", Mode: 0o600, ModTime: now}, nil)
	add(&tar.Header{Typeflag: tar.TypeReg, Name: "b/.wh..wh..opq", Mode: 0o600, ModTime: now}, nil)
	add(&tar.Header{Typeflag: tar.TypeReg, Name: strings.Repeat("n", 300), Mode: 0o644, Size: 1, ModTime: now, Format: tar.FormatGNU}, []byte("x"))
	add(&tar.Header{Typeflag: tar.TypeReg, Name: "x/" + strings.Repeat("p", 200), Mode: 0o644, Size: 2, ModTime: now, Format: tar.FormatPAX,
		PAXRecords: map[string]string{"SCHILY.xattr.user.k": "v", "comment": "keep me"}}, []byte("xy"))
	add(&tar.Header{Typeflag: tar.TypeLink, Name: "a/g", Linkname: "a/f", ModTime: now}, nil)
	add(&tar.Header{Typeflag: tar.TypeXGlobalHeader, Name: "global", PAXRecords: map[string]string{"comment": "global"}}, nil)
	add(&tar.Header{Typeflag: tar.TypeSymlink, Name: "a/l", Linkname: "/abs/target", ModTime: now}, nil)
	add(&tar.Header{Typeflag: tar.TypeChar, Name: "dev/null", Devmajor: 1, Devminor: 3, Mode: 0o666, ModTime: now}, nil)
	must(t, tw.Close())
	buf.Write(make([]byte, 3000)) // trailing junk after end-of-archive
	plain := buf.Bytes()
	for _, enc := range encodings {
		t.Run(enc.name, func(t *testing.T) {
			m := roundTrip(t, enc.enc(t, plain), plain)
			var paths []string
			for _, e := range m.Entries {
				s := e.Path
				if e.Whiteout {
					s = "wh:" + s
				}
				if e.Opaque {
					s = "opq:" + s
				}
				paths = append(paths, s)
			}
			want := ". a a/f a/f wh:a/gone opq:b " + strings.Repeat("n", 300) + " x/" + strings.Repeat("p", 200) + " a/g a/l dev/null"
			if got := strings.Join(paths, " "); got != want {
				t.Fatalf("paths\n got %s\nwant %s", got, want)
			}
			if e := m.Entries[1]; !e.ModTime.Equal(now) || !e.AccessTime.Equal(now) {
				t.Errorf("sub-second PAX times lost: %v %v", e.ModTime, e.AccessTime)
			}
			if m.Entries[7].Xattrs["user.k"] != "v" {
				t.Errorf("xattr lost: %v", m.Entries[7].Xattrs)
			}
			if e := m.Entries[8]; e.Type != TypeHardlink || e.Linkname != "a/f" {
				t.Errorf("hardlink %+v", e)
			}
		})
	}
}
