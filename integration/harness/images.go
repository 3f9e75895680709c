package harness

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// File is one entry of a test layer. Exactly one of Src (a host file whose
// bytes are used), Data, Link (symlink target) or Dir is set.
type File struct {
	Path string // in the image, relative ("usr/bin/sh")
	Src  string
	Data []byte
	Link string
	Dir  bool
	Mode int64 // 0: 0755 dirs, 0644 files (0755 if the source is executable)
}

// SHA256 is the hex digest of the file's content (regular files only).
func (f File) SHA256() (string, error) {
	h := sha256.New()
	if f.Src != "" {
		r, err := os.Open(f.Src)
		if err != nil {
			return "", err
		}
		defer r.Close()
		if _, err := io.Copy(h, r); err != nil {
			return "", err
		}
	} else {
		h.Write(f.Data)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// Size of the content of a regular file.
func (f File) Size() int64 {
	if f.Src != "" {
		if st, err := os.Stat(f.Src); err == nil {
			return st.Size()
		}
	}
	return int64(len(f.Data))
}

// IsRegular reports whether f is a regular file.
func (f File) IsRegular() bool { return f.Link == "" && !f.Dir }

// Layer builds a gzip OCI layer from files; missing parent dirs are
// added, times are fixed so equal specs give equal layers.
func Layer(files []File) (v1.Layer, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	mtime := time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)
	seen := map[string]bool{}
	var mkdirs func(p string) error
	mkdirs = func(p string) error {
		if p == "." || p == "" || seen[p] {
			return nil
		}
		if err := mkdirs(filepath.Dir(p)); err != nil {
			return err
		}
		seen[p] = true
		return tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: p + "/", Mode: 0o755, ModTime: mtime, Format: tar.FormatPAX})
	}
	for _, f := range files {
		p := strings.TrimPrefix(filepath.Clean(f.Path), "/")
		if err := mkdirs(filepath.Dir(p)); err != nil {
			return nil, err
		}
		hdr := &tar.Header{Name: p, ModTime: mtime, Mode: f.Mode, Format: tar.FormatPAX}
		var body io.Reader
		switch {
		case f.Dir:
			if seen[p] {
				continue
			}
			seen[p] = true
			hdr.Typeflag, hdr.Name = tar.TypeDir, p+"/"
			if hdr.Mode == 0 {
				hdr.Mode = 0o755
			}
		case f.Link != "":
			hdr.Typeflag, hdr.Linkname = tar.TypeSymlink, f.Link
			hdr.Mode = 0o777
		default:
			hdr.Typeflag = tar.TypeReg
			data := f.Data
			if f.Src != "" {
				b, err := os.ReadFile(f.Src)
				if err != nil {
					return nil, err
				}
				data = b
				if hdr.Mode == 0 {
					if st, err := os.Stat(f.Src); err == nil && st.Mode()&0o111 != 0 {
						hdr.Mode = 0o755
					}
				}
			}
			if hdr.Mode == 0 {
				hdr.Mode = 0o644
			}
			hdr.Size = int64(len(data))
			body = bytes.NewReader(data)
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, err
		}
		if body != nil {
			if _, err := io.Copy(tw, body); err != nil {
				return nil, err
			}
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	b := buf.Bytes()
	return tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil })
}

// Image stacks layers into a linux/amd64 image whose default command is cmd.
func Image(cmd []string, layers ...v1.Layer) (v1.Image, error) {
	img, err := mutate.AppendLayers(empty.Image, layers...)
	if err != nil {
		return nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", "amd64"
	cf.Config.Cmd = cmd
	cf.Config.Env = []string{"PATH=/usr/local/bin:/usr/bin:/bin"}
	return mutate.ConfigFile(img, cf)
}

// BaseFiles is a minimal userland from this machine: sh and the coreutils
// the tests use, their shared libraries, and the merged-/usr symlinks.
func BaseFiles() ([]File, error) {
	bins := []string{"sh", "cat", "ls", "mv", "rm", "echo", "sleep", "sha256sum", "mkdir", "cp", "stat", "wc", "sync", "test", "head", "date", "ln", "dd", "df"}
	var paths []string
	for _, b := range bins {
		p, err := exec.LookPath(b)
		if err != nil {
			return nil, fmt.Errorf("base image needs %s: %w", b, err)
		}
		paths = append(paths, p)
		out, err := exec.Command("ldd", p).Output()
		if err != nil {
			continue // static binary
		}
		for _, line := range strings.Split(string(out), "\n") {
			for _, f := range strings.Fields(line) {
				if strings.HasPrefix(f, "/") {
					paths = append(paths, f)
				}
			}
		}
	}
	files := map[string]File{}
	var add func(p string, depth int) error
	add = func(p string, depth int) error {
		if depth > 10 {
			return fmt.Errorf("symlink loop at %s", p)
		}
		// Resolve symlinked parent dirs (/lib -> usr/lib) first, keeping the
		// links themselves as entries.
		p = filepath.Clean(p)
		dir := filepath.Dir(p)
		if dir != "/" {
			if st, err := os.Lstat(dir); err == nil && st.Mode()&fs.ModeSymlink != 0 {
				if err := add(dir, depth+1); err != nil {
					return err
				}
				real, err := filepath.EvalSymlinks(dir)
				if err != nil {
					return err
				}
				return add(filepath.Join(real, filepath.Base(p)), depth+1)
			}
			if real, err := filepath.EvalSymlinks(dir); err == nil && real != dir {
				return add(filepath.Join(real, filepath.Base(p)), depth+1)
			}
		}
		key := strings.TrimPrefix(p, "/")
		if _, ok := files[key]; ok {
			return nil
		}
		st, err := os.Lstat(p)
		if err != nil {
			return err
		}
		if st.Mode()&fs.ModeSymlink != 0 {
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			files[key] = File{Path: key, Link: target}
			abs := target
			if !filepath.IsAbs(abs) {
				abs = filepath.Join(filepath.Dir(p), target)
			}
			return add(abs, depth+1)
		}
		if st.IsDir() {
			files[key] = File{Path: key, Dir: true}
			return nil
		}
		files[key] = File{Path: key, Src: p}
		return nil
	}
	for _, p := range paths {
		if err := add(p, 0); err != nil {
			return nil, err
		}
	}
	for _, top := range []string{"/bin", "/sbin", "/lib", "/lib64"} {
		if st, err := os.Lstat(top); err == nil && st.Mode()&fs.ModeSymlink != 0 {
			if err := add(top, 0); err != nil {
				return nil, err
			}
		}
	}
	out := make([]File, 0, len(files)+3)
	for _, f := range files {
		out = append(out, f)
	}
	out = append(out, File{Path: "tmp", Dir: true, Mode: 0o1777}, File{Path: "etc", Dir: true}, File{Path: "root", Dir: true, Mode: 0o700})
	sort.Slice(out, func(i, j int) bool { return out[i].Path < out[j].Path })
	return out, nil
}

// HostFiles picks regular files (no larger than maxSize) from the first of
// dirs that exist, in lexical order, until maxFiles or maxBytes is reached.
// Their image paths equal their host paths.
func HostFiles(dirs []string, maxFiles int, maxSize, maxBytes int64) ([]File, error) {
	var out []File
	var total int64
	stop := fmt.Errorf("enough")
	for _, d := range dirs {
		err := filepath.WalkDir(d, func(p string, de fs.DirEntry, err error) error {
			if err != nil {
				return nil
			}
			if !de.Type().IsRegular() {
				return nil
			}
			info, err := de.Info()
			if err != nil || info.Size() > maxSize || info.Mode()&0o444 == 0 {
				return nil
			}
			if len(out) >= maxFiles || total+info.Size() > maxBytes {
				return stop
			}
			out = append(out, File{Path: strings.TrimPrefix(p, "/"), Src: p, Mode: int64(info.Mode().Perm())})
			total += info.Size()
			return nil
		})
		if err == stop {
			break
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no host files found under %v", dirs)
	}
	return out, nil
}

// Relocate returns files under a new prefix (same bytes, other paths): a
// layer made of them shares every file, and no layer, with the original.
func Relocate(files []File, prefix string) []File {
	out := make([]File, len(files))
	for i, f := range files {
		f.Path = filepath.Join(prefix, f.Path)
		out[i] = f
	}
	return out
}

// ChecksumList renders "sha256  /path" lines (sha256sum -c format) of the
// regular files.
func ChecksumList(files []File) ([]byte, error) {
	var b bytes.Buffer
	for _, f := range files {
		if !f.IsRegular() {
			continue
		}
		sum, err := f.SHA256()
		if err != nil {
			return nil, err
		}
		fmt.Fprintf(&b, "%s  /%s\n", sum, f.Path)
	}
	return b.Bytes(), nil
}
