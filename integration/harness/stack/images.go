package stack

import (
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"math/rand/v2"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/dupsnap/dupsnap/integration/harness"
)

// Image is one demo image and what it is made of.
type Image struct {
	Repo    string // "demo/img0:v1"
	Img     v1.Image
	Layers  []string // what each layer is, for the log
	Files   int      // regular files
	Logical int64    // bytes of regular files
	Sums    string   // in-image path of a sha256sum -c list of some of its files
}

// SetOptions size the demo image set.
type SetOptions struct {
	Images  int // number of images (>= 1)
	ImageMB int // approximate uncompressed MiB per image
	// Extra layers appended to every image (bench tool, big file).
	Extra [][]harness.File
}

// BuildSet makes Images images with real duplication from files of this
// machine's /usr (no network):
//   - every image shares the base layer (sh, coreutils, their libraries);
//   - images 2p and 2p+1 share a "runtime" layer byte for byte (shared layer);
//   - each image has a layer of files of another pair's runtime, relocated
//     under /opt/<image>: same bytes, different layer (shared files only);
//   - each image has a layer of files of its own (unique content).
func BuildSet(o SetOptions, logf func(string, ...any)) ([]*Image, error) {
	if o.Images < 1 {
		o.Images = 1
	}
	if o.ImageMB < 4 {
		o.ImageMB = 4
	}
	pairs := (o.Images + 1) / 2
	chunk := int64(o.ImageMB) << 20 * 2 / 5 // runtime and relocated layer: 2/5 each, unique: 1/5
	uniq := chunk / 2
	base, err := harness.BaseFiles()
	if err != nil {
		return nil, fmt.Errorf("base files: %w", err)
	}
	baseSet := map[string]bool{}
	for _, f := range base {
		baseSet[f.Path] = true
	}
	want := chunk*int64(pairs) + uniq*int64(o.Images)
	pool, err := PickFiles([]string{"/usr/lib/x86_64-linux-gnu", "/usr/share", "/usr/bin", "/usr/libexec"}, 8<<20, want)
	if err != nil {
		return nil, err
	}
	var kept []harness.File
	for _, f := range pool {
		if !baseSet[f.Path] {
			kept = append(kept, f)
		}
	}
	// Cut the pool into the pairs' runtime chunks, then the unique chunks
	// (half as big), at cumulative byte boundaries scaled to what the pool
	// holds, so that one large file's overshoot is not carried forward.
	total := sum(kept)
	unit := float64(total) / (float64(pairs) + float64(o.Images)/2)
	var bounds []int64
	acc := 0.0
	for k := 0; k < pairs+o.Images; k++ {
		if k < pairs {
			acc += unit
		} else {
			acc += unit / 2
		}
		bounds = append(bounds, int64(acc))
	}
	chunks := make([][]harness.File, pairs+o.Images)
	var cum int64
	k := 0
	for _, f := range kept {
		for k < len(bounds)-1 && cum >= bounds[k] {
			k++
		}
		chunks[k] = append(chunks[k], f)
		cum += f.Size()
	}
	logf("  demo images: %d, from %d host files (%s) under /usr", o.Images, len(kept), MiB(sum(kept)))

	baseLayer, err := GzipLayer(base)
	if err != nil {
		return nil, err
	}
	runtimes := make([]v1.Layer, pairs)
	for p := range pairs {
		if runtimes[p], err = GzipLayer(chunks[p]); err != nil {
			return nil, err
		}
	}
	var out []*Image
	for i := range o.Images {
		name := fmt.Sprintf("img%d", i)
		other := chunks[(i/2+1)%pairs]
		reloc := harness.Relocate(other, "opt/"+name)
		own := chunks[pairs+i]
		var checked []harness.File
		for _, fs := range [][]harness.File{chunks[i/2], reloc, own} {
			checked = append(checked, pick(fs, 12)...)
		}
		list, err := harness.ChecksumList(checked)
		if err != nil {
			return nil, err
		}
		app := append([]harness.File{{Path: "demo/sums.txt", Data: list}, {Path: "demo/name", Data: []byte(name + "\n")}}, own...)
		relocLayer, err := GzipLayer(reloc)
		if err != nil {
			return nil, err
		}
		appLayer, err := GzipLayer(app)
		if err != nil {
			return nil, err
		}
		layers := []v1.Layer{baseLayer, runtimes[i/2], relocLayer, appLayer}
		desc := []string{"base (all images)", fmt.Sprintf("runtime%d (shared with its pair)", i/2), fmt.Sprintf("files of runtime%d under /opt/%s", (i/2+1)%pairs, name), "own files"}
		for _, files := range o.Extra {
			l, err := GzipLayer(files)
			if err != nil {
				return nil, err
			}
			layers = append(layers, l)
			desc = append(desc, "extra")
		}
		img, err := harness.Image([]string{"/bin/sh"}, layers...)
		if err != nil {
			return nil, err
		}
		all := [][]harness.File{base, chunks[i/2], reloc, app}
		all = append(all, o.Extra...)
		im := &Image{Repo: "demo/" + name + ":v1", Img: img, Layers: desc, Sums: "/demo/sums.txt"}
		for _, fs := range all {
			for _, f := range fs {
				if f.IsRegular() {
					im.Files++
					im.Logical += f.Size()
				}
			}
		}
		out = append(out, im)
	}
	return out, nil
}

func pick(fs []harness.File, n int) []harness.File {
	if len(fs) <= n {
		return fs
	}
	out := make([]harness.File, 0, n)
	for i := 0; i < n; i++ {
		out = append(out, fs[i*len(fs)/n])
	}
	return out
}

func sum(fs []harness.File) int64 {
	var n int64
	for _, f := range fs {
		n += f.Size()
	}
	return n
}

// GzipLayer builds a gzip layer of files (harness.Layer's tar) compressed
// once, at the default level, as registries usually hold them.
func GzipLayer(files []harness.File) (v1.Layer, error) {
	raw, err := harness.Layer(files)
	if err != nil {
		return nil, err
	}
	rc, err := raw.Uncompressed()
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	if _, err := io.Copy(zw, rc); err != nil {
		return nil, err
	}
	if err := zw.Close(); err != nil {
		return nil, err
	}
	b := buf.Bytes()
	return tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil })
}

// RandomData is n deterministic pseudo-random bytes (incompressible, so
// no store gets an unfair advantage from compression).
func RandomData(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n+8)
	for i := 0; i < n; i += 8 {
		v := r.Uint64()
		for j := 0; j < 8; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	return b[:n]
}

// MiB formats bytes as MiB with one decimal.
func MiB(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }

// Short is a repo without the "demo/" prefix and tag.
func (im *Image) Short() string {
	s := strings.TrimPrefix(im.Repo, "demo/")
	return strings.TrimSuffix(s, ":v1")
}

// PickFiles is like harness.HostFiles but skips files that would overrun
// maxBytes instead of stopping there, so that one large file early in the
// walk does not leave the set nearly empty; it stops once 95% is reached.
func PickFiles(dirs []string, maxSize, maxBytes int64) ([]harness.File, error) {
	var out []harness.File
	var total int64
	seen := map[string]bool{}
	for _, d := range dirs {
		if total >= maxBytes*95/100 {
			break
		}
		fs, err := harness.HostFiles([]string{d}, 1<<20, maxSize, 1<<62)
		if err != nil {
			continue
		}
		for _, f := range fs {
			if seen[f.Path] {
				continue
			}
			sz := f.Size()
			if total+sz > maxBytes {
				continue
			}
			seen[f.Path] = true
			out = append(out, f)
			total += sz
			if total >= maxBytes*95/100 {
				break
			}
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no host files found under %v", dirs)
	}
	return out, nil
}
