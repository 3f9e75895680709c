// Package proxytest has test helpers for dupproxy: an in-process upstream
// registry (go-containerregistry's pkg/registry, blobs scoped per
// repository), image builders with real file duplication and gzip, zstd and
// uncompressed layers, and a proxy started on a temp root.
package proxytest

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/dupsnap/dupsnap/proxy"
)

// File is one tar entry.
type File struct {
	Name string
	Body []byte
	Dir  bool
	Mode int64
	// Link makes a symlink (Typeflag '2') or, with Hard, a hardlink.
	Link string
	Hard bool
}

// Tar builds an uncompressed layer tar.
func Tar(t testing.TB, files []File) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	mt := time.Unix(1700000000, 0)
	for _, f := range files {
		h := &tar.Header{Name: f.Name, Mode: f.Mode, ModTime: mt, Uid: 0, Gid: 0, Format: tar.FormatPAX}
		switch {
		case f.Dir:
			h.Typeflag, h.Name = tar.TypeDir, strings.TrimSuffix(f.Name, "/")+"/"
		case f.Link != "" && f.Hard:
			h.Typeflag, h.Linkname = tar.TypeLink, f.Link
		case f.Link != "":
			h.Typeflag, h.Linkname = tar.TypeSymlink, f.Link
		default:
			h.Typeflag, h.Size = tar.TypeReg, int64(len(f.Body))
		}
		if h.Mode == 0 {
			h.Mode = 0o644
			if f.Dir {
				h.Mode = 0o755
			}
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatalf("tar header %s: %v", f.Name, err)
		}
		if h.Typeflag == tar.TypeReg {
			if _, err := tw.Write(f.Body); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// Compression of a test layer.
const (
	Uncompressed = "tar"
	Gzip         = "gzip"
	Zstd         = "zstd"
	// GzipMultiMember: two gzip members, which no single encoder reproduces
	// (the blob must then be retained).
	GzipMultiMember = "gzip-multi"
)

// Compress encodes a tar as a layer blob and returns its media type.
func Compress(t testing.TB, tarb []byte, format string) ([]byte, string) {
	t.Helper()
	var buf bytes.Buffer
	switch format {
	case Uncompressed:
		return tarb, ocispec.MediaTypeImageLayer
	case Gzip:
		zw := gzip.NewWriter(&buf)
		zw.Write(tarb)
		zw.Close()
		return buf.Bytes(), ocispec.MediaTypeImageLayerGzip
	case GzipMultiMember:
		half := len(tarb) / 2
		for _, part := range [][]byte{tarb[:half], tarb[half:]} {
			zw, _ := gzip.NewWriterLevel(&buf, gzip.BestSpeed)
			zw.Write(part)
			zw.Close()
		}
		return buf.Bytes(), ocispec.MediaTypeImageLayerGzip
	case Zstd:
		zw, err := zstd.NewWriter(&buf)
		if err != nil {
			t.Fatal(err)
		}
		zw.Write(tarb)
		zw.Close()
		return buf.Bytes(), ocispec.MediaTypeImageLayerZstd
	}
	t.Fatalf("unknown format %q", format)
	return nil, ""
}

// Layer is a layer to push.
type Layer struct {
	Files  []File
	Format string
	// Blob overrides the encoded bytes (hostile tests); DiffID is then taken from Tar.
	Blob []byte
}

// Image is what PushImage pushed.
type Image struct {
	Repo, Tag string
	Manifest  []byte
	Digest    digest.Digest
	Config    ocispec.Descriptor
	Layers    []ocispec.Descriptor
	DiffIDs   []digest.Digest
	Blobs     map[digest.Digest][]byte
	Tars      map[digest.Digest][]byte // by layer digest
}

// Upstream is an in-process registry.
type Upstream struct {
	URL  string // http://127.0.0.1:port
	Host string // 127.0.0.1:port
	srv  *httptest.Server
	reg  http.Handler
	// Wrap, when set, sees every request first (hostile upstream, auth).
	wrap atomic.Pointer[func(w http.ResponseWriter, r *http.Request, next http.Handler)]
	down atomic.Bool
}

// StartUpstream starts a registry closed at test cleanup.
func StartUpstream(t testing.TB) *Upstream {
	u := &Upstream{reg: registry.New(registry.WithReferrersSupport(true), registry.WithBlobHandler(newRepoBlobs()),
		registry.Logger(nopLogger()))}
	u.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if u.down.Load() {
			// Like a dead host: drop the connection.
			if hj, ok := w.(http.Hijacker); ok {
				c, _, err := hj.Hijack()
				if err == nil {
					c.Close()
					return
				}
			}
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		if f := u.wrap.Load(); f != nil {
			(*f)(w, r, u.reg)
			return
		}
		u.reg.ServeHTTP(w, r)
	}))
	t.Cleanup(u.srv.Close)
	u.URL = u.srv.URL
	pu, _ := url.Parse(u.URL)
	u.Host = pu.Host
	return u
}

// SetDown makes the upstream drop every connection (or serve again).
func (u *Upstream) SetDown(down bool) { u.down.Store(down) }

// Wrap installs a request interceptor (nil removes it).
func (u *Upstream) Wrap(f func(w http.ResponseWriter, r *http.Request, next http.Handler)) {
	if f == nil {
		u.wrap.Store(nil)
		return
	}
	u.wrap.Store(&f)
}

// PushBlob uploads one blob monolithically.
func (u *Upstream) PushBlob(t testing.TB, repo string, b []byte) digest.Digest {
	t.Helper()
	d := digest.FromBytes(b)
	resp, err := http.Post(fmt.Sprintf("%s/v2/%s/blobs/uploads/?digest=%s", u.URL, repo, d), "application/octet-stream", bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode == http.StatusAccepted {
		// Registries without monolithic POST (distribution v3) open a
		// session instead: finish it with one PUT.
		loc, err := resp.Location()
		if err != nil {
			t.Fatalf("push blob %s: %v", d, err)
		}
		q := loc.Query()
		q.Set("digest", d.String())
		loc.RawQuery = q.Encode()
		req, _ := http.NewRequest(http.MethodPut, loc.String(), bytes.NewReader(b))
		req.Header.Set("Content-Type", "application/octet-stream")
		if resp, err = http.DefaultClient.Do(req); err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
	}
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("push blob %s: %s", d, resp.Status)
	}
	return d
}

// PushManifest puts a manifest under ref (tag or digest).
func (u *Upstream) PushManifest(t testing.TB, repo, ref, mediaType string, b []byte) digest.Digest {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPut, fmt.Sprintf("%s/v2/%s/manifests/%s", u.URL, repo, ref), bytes.NewReader(b))
	req.Header.Set("Content-Type", mediaType)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("push manifest %s:%s: %s %s", repo, ref, resp.Status, body)
	}
	return digest.FromBytes(b)
}

// PushImage builds and pushes a single-platform OCI image.
func (u *Upstream) PushImage(t testing.TB, repo, tag string, layers []Layer) *Image {
	t.Helper()
	img := &Image{Repo: repo, Tag: tag, Blobs: map[digest.Digest][]byte{}, Tars: map[digest.Digest][]byte{}}
	for _, l := range layers {
		tb := Tar(t, l.Files)
		blob, mt := Compress(t, tb, l.Format)
		if l.Blob != nil {
			blob = l.Blob
		}
		d := u.PushBlob(t, repo, blob)
		img.Blobs[d] = blob
		img.Tars[d] = tb
		img.Layers = append(img.Layers, ocispec.Descriptor{MediaType: mt, Digest: d, Size: int64(len(blob))})
		img.DiffIDs = append(img.DiffIDs, digest.FromBytes(tb))
	}
	cfg := ocispec.Image{Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"},
		RootFS: ocispec.RootFS{Type: "layers", DiffIDs: img.DiffIDs},
		Config: ocispec.ImageConfig{Cmd: []string{"/bin/true"}, Labels: map[string]string{"image": repo + ":" + tag}}}
	cb, _ := json.Marshal(cfg)
	cd := u.PushBlob(t, repo, cb)
	img.Blobs[cd] = cb
	img.Config = ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: cd, Size: int64(len(cb))}
	m := ocispec.Manifest{MediaType: ocispec.MediaTypeImageManifest, Config: img.Config, Layers: img.Layers}
	m.SchemaVersion = 2
	mb, _ := json.Marshal(m)
	img.Manifest = mb
	img.Digest = u.PushManifest(t, repo, tag, ocispec.MediaTypeImageManifest, mb)
	return img
}

// repoBlobs scopes ggcr's in-memory blobs per repository, like real
// registries, so that cross-repository reads are refused upstream too.
type repoBlobs struct {
	inner registry.BlobHandler
	mu    sync.Mutex
	in    map[string]bool // repo + "@" + digest
}

func newRepoBlobs() *repoBlobs {
	return &repoBlobs{inner: registry.NewInMemoryBlobHandler(), in: map[string]bool{}}
}

var missing = v1.Hash{Algorithm: "sha256", Hex: strings.Repeat("0", 64)}

func (b *repoBlobs) has(repo string, h v1.Hash) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.in[repo+"@"+h.String()]
}

func (b *repoBlobs) Get(ctx context.Context, repo string, h v1.Hash) (io.ReadCloser, error) {
	if !b.has(repo, h) {
		h = missing // the inner handler answers with its own not-found error
	}
	return b.inner.Get(ctx, repo, h)
}

func (b *repoBlobs) Stat(ctx context.Context, repo string, h v1.Hash) (int64, error) {
	if !b.has(repo, h) {
		h = missing
	}
	return b.inner.(registry.BlobStatHandler).Stat(ctx, repo, h)
}

func (b *repoBlobs) Put(ctx context.Context, repo string, h v1.Hash, rc io.ReadCloser) error {
	if err := b.inner.(registry.BlobPutHandler).Put(ctx, repo, h, rc); err != nil {
		return err
	}
	b.mu.Lock()
	b.in[repo+"@"+h.String()] = true
	b.mu.Unlock()
	return nil
}

// Storage, when set, gives every StartProxy without a storage config its
// backend: how tests written for the local store run over S3 too.
var Storage func(t testing.TB) proxy.StorageConfig

// Proxy is a dupproxy served over HTTP for a test.
type Proxy struct {
	*proxy.Server
	URL  string
	Host string
	Cfg  proxy.Config
	srv  *httptest.Server
}

// StartProxy opens a proxy on a temp root (cfg.Root/CacheDir may be preset
// to restart over an existing store) in front of cfg.Upstream.
func StartProxy(t testing.TB, cfg proxy.Config) *Proxy {
	t.Helper()
	if cfg.Storage.Type == "" && Storage != nil {
		cfg.Storage = Storage(t)
	}
	if cfg.Root == "" {
		cfg.Root = t.TempDir()
	}
	cfg.NoSync = true
	if cfg.GCInterval == 0 {
		cfg.GCInterval = -1
	}
	s, err := proxy.Open(context.Background(), cfg)
	if err != nil {
		t.Fatalf("open proxy: %v", err)
	}
	p := &Proxy{Server: s, Cfg: cfg}
	p.srv = httptest.NewServer(s)
	p.URL = p.srv.URL
	pu, _ := url.Parse(p.URL)
	p.Host = pu.Host
	t.Cleanup(p.Stop)
	return p
}

// Stop closes the HTTP server and the store (idempotent).
func (p *Proxy) Stop() {
	if p.srv == nil {
		return
	}
	p.srv.CloseClientConnections()
	p.srv.Close()
	p.Server.Close()
	p.srv = nil
}
