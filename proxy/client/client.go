// Package client is the Go client of dupproxy's dedup API (docs/dupproxy.md),
// used by dupsnap to pull a layer as its file manifest plus only the file
// objects the node lacks. Every object is verified against its digest
// before it is put into the caller's CAS batch.
package client

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sync/errgroup"

	"github.com/dupsnap/dupsnap/pkg/cas"
	"github.com/dupsnap/dupsnap/pkg/layout"
	"github.com/dupsnap/dupsnap/proxy"
)

var (
	// ErrNotFound: the proxy does not serve that layer through that
	// repository (unknown, or not referenced by the repository's manifests).
	ErrNotFound = errors.New("dupproxy: not found")
	// ErrDenied: the proxy or the upstream refused the credentials.
	ErrDenied = errors.New("dupproxy: access denied")
	// ErrCorrupt: the proxy sent data that does not match its digest.
	ErrCorrupt = errors.New("dupproxy: corrupt response")
)

// Client talks to one dupproxy.
type Client struct {
	base string // http://host:port
	http *http.Client
	// Namespace is sent as ?ns= (the registry host the repository lives on).
	Namespace string
	// Authorization header to send (Basic credentials for passthrough mode).
	Authorization string
	// BatchSize is the number of objects per request (default 512).
	BatchSize int
	// Parallel is the number of concurrent requests (default 4).
	Parallel int
	// MaxRetries: a batch that ends early is re-posted for what is missing (default 3).
	MaxRetries int
}

// New returns a client of the proxy at base (e.g. "http://dupproxy:5000").
func New(base string, hc *http.Client) *Client {
	if hc == nil {
		hc = &http.Client{}
	}
	return &Client{base: strings.TrimSuffix(base, "/"), http: hc, BatchSize: 512, Parallel: 4, MaxRetries: 3}
}

// Layer is a layer's file manifest as served by the proxy.
type Layer struct {
	Digest    digest.Digest // blob digest
	DiffID    digest.Digest
	MediaType string
	Size      int64 // blob size
	Manifest  *layout.Manifest
	WireBytes int64 // manifest bytes received
}

// LayerManifest fetches the manifest of layer (blob digest) through repo.
func (c *Client) LayerManifest(ctx context.Context, repo string, layer digest.Digest) (*Layer, error) {
	return c.layer(ctx, repo, "layers", layer)
}

// LayerManifestByDiffID looks the layer up by its diffID (nerdctl only passes
// containerd.io/snapshot/diff-id); same authorization rule.
func (c *Client) LayerManifestByDiffID(ctx context.Context, repo string, diffID digest.Digest) (*Layer, error) {
	return c.layer(ctx, repo, "diffids", diffID)
}

func (c *Client) url(repo, p string) string {
	u := c.base + "/dedup/v1/" + repo + p
	if c.Namespace != "" {
		u += "?ns=" + url.QueryEscape(c.Namespace)
	}
	return u
}

func (c *Client) do(req *http.Request) (*http.Response, error) {
	if c.Authorization != "" {
		req.Header.Set("Authorization", c.Authorization)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("dupproxy %s: %w", req.URL.Path, err)
	}
	if resp.StatusCode == http.StatusOK {
		return resp, nil
	}
	defer resp.Body.Close()
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	err = fmt.Errorf("dupproxy %s: %s: %s", req.URL.Path, resp.Status, bytes.TrimSpace(msg))
	switch resp.StatusCode {
	case http.StatusNotFound:
		err = fmt.Errorf("%w: %w", ErrNotFound, err)
	case http.StatusUnauthorized, http.StatusForbidden:
		err = fmt.Errorf("%w: %w", ErrDenied, err)
	}
	return nil, err
}

func (c *Client) layer(ctx context.Context, repo, kind string, d digest.Digest) (*Layer, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.url(repo, "/"+kind+"/"+d.String()+"/manifest"), nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<30))
	if err != nil {
		return nil, fmt.Errorf("reading layer manifest: %w", err)
	}
	m, err := layout.Unmarshal(b)
	if err != nil {
		return nil, fmt.Errorf("%w: layer manifest: %w", ErrCorrupt, err)
	}
	l := &Layer{MediaType: resp.Header.Get(proxy.HeaderMediaType), Manifest: m, WireBytes: int64(len(b))}
	if l.Digest, err = digest.Parse(resp.Header.Get(proxy.HeaderLayerDigest)); err != nil {
		return nil, fmt.Errorf("%w: layer digest header: %w", ErrCorrupt, err)
	}
	if l.DiffID, err = digest.Parse(resp.Header.Get(proxy.HeaderDiffID)); err != nil {
		return nil, fmt.Errorf("%w: diffID header: %w", ErrCorrupt, err)
	}
	l.Size, _ = strconv.ParseInt(resp.Header.Get(proxy.HeaderLayerSize), 10, 64)
	if m.DiffID != l.DiffID || (kind == "layers" && l.Digest != d) || (kind == "diffids" && l.DiffID != d) {
		return nil, fmt.Errorf("%w: proxy answered layer %s/diffID %s (manifest %s) for %s", ErrCorrupt, l.Digest, l.DiffID, m.DiffID, d)
	}
	return l, nil
}

// FetchStats counts what FetchObjects transferred.
type FetchStats struct {
	Objects   int
	Bytes     int64 // uncompressed object bytes written
	WireBytes int64 // response bytes received
	Requests  int
}

// FetchObjects fetches want (objects of the given layers of repo) into b, in
// parallel batches; objects are verified as they are put (b.PutExpected). A
// batch cut short is re-posted for what is still missing. The caller commits b.
func (c *Client) FetchObjects(ctx context.Context, repo string, layers []digest.Digest, want []digest.Digest, b *cas.Batch) (FetchStats, error) {
	var st FetchStats
	var mu sync.Mutex
	bs := c.BatchSize
	if bs <= 0 {
		bs = 512
	}
	g, gctx := errgroup.WithContext(ctx)
	par := c.Parallel
	if par <= 0 {
		par = 4
	}
	g.SetLimit(par)
	for i := 0; i < len(want); i += bs {
		batch := want[i:min(i+bs, len(want))]
		g.Go(func() error {
			bst, err := c.fetchBatch(gctx, repo, layers, batch, b)
			mu.Lock()
			st.Objects += bst.Objects
			st.Bytes += bst.Bytes
			st.WireBytes += bst.WireBytes
			st.Requests += bst.Requests
			mu.Unlock()
			return err
		})
	}
	err := g.Wait()
	return st, err
}

func (c *Client) fetchBatch(ctx context.Context, repo string, layers, want []digest.Digest, b *cas.Batch) (FetchStats, error) {
	var st FetchStats
	missing := map[digest.Digest]bool{}
	for _, d := range want {
		missing[d] = true
	}
	retries := c.MaxRetries
	if retries <= 0 {
		retries = 3
	}
	for attempt := 0; len(missing) > 0; attempt++ {
		if attempt > retries {
			return st, fmt.Errorf("dupproxy: %d objects still missing after %d requests", len(missing), attempt)
		}
		ask := make([]digest.Digest, 0, len(missing))
		for _, d := range want {
			if missing[d] {
				ask = append(ask, d)
			}
		}
		got, err := c.post(ctx, repo, layers, ask, b, &st)
		for _, d := range got {
			delete(missing, d)
		}
		if err != nil {
			// Corrupt data or refusals are final; a cut stream is retried.
			if errors.Is(err, ErrCorrupt) || errors.Is(err, ErrNotFound) || errors.Is(err, ErrDenied) || ctx.Err() != nil {
				return st, err
			}
			if len(got) == 0 && attempt >= 1 {
				return st, err
			}
		}
	}
	return st, nil
}

type countReader struct {
	r io.Reader
	n *int64
}

func (c countReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	atomic.AddInt64(c.n, int64(n))
	return n, err
}

// post sends one objects request and puts every frame received into b.
// It returns the digests stored, also on error.
func (c *Client) post(ctx context.Context, repo string, layers, ask []digest.Digest, b *cas.Batch, st *FetchStats) ([]digest.Digest, error) {
	body, _ := json.Marshal(proxy.ObjectsRequest{Layers: layers, Objects: ask})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.url(repo, "/objects"), bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	st.Requests++
	resp, err := c.do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	br := bufio.NewReaderSize(countReader{resp.Body, &st.WireBytes}, 256<<10)
	magic := make([]byte, len(proxy.ObjectsMagic))
	if _, err := io.ReadFull(br, magic); err != nil || string(magic) != proxy.ObjectsMagic {
		return nil, fmt.Errorf("%w: not an objects stream", ErrCorrupt)
	}
	asked := map[digest.Digest]bool{}
	for _, d := range ask {
		asked[d] = true
	}
	var got []digest.Digest
	var dec *zstd.Decoder
	defer func() {
		if dec != nil {
			dec.Close()
		}
	}()
	var hdr [49]byte
	for {
		if _, err := io.ReadFull(br, hdr[:1]); err != nil {
			return got, fmt.Errorf("objects stream cut: %w", err)
		}
		if hdr[0] == proxy.FrameEnd {
			var n [8]byte
			if _, err := io.ReadFull(br, n[:]); err != nil {
				return got, fmt.Errorf("objects stream cut: %w", err)
			}
			if binary.BigEndian.Uint64(n[:]) != uint64(len(got)) {
				return got, fmt.Errorf("%w: end frame counts %d objects, %d received", ErrCorrupt, binary.BigEndian.Uint64(n[:]), len(got))
			}
			return got, nil
		}
		if _, err := io.ReadFull(br, hdr[1:]); err != nil {
			return got, fmt.Errorf("objects stream cut: %w", err)
		}
		d := digest.NewDigestFromEncoded(digest.SHA256, hex.EncodeToString(hdr[1:33]))
		size := int64(binary.BigEndian.Uint64(hdr[33:41]))
		length := int64(binary.BigEndian.Uint64(hdr[41:49]))
		if !asked[d] || size < 0 || length < 0 {
			return got, fmt.Errorf("%w: unexpected frame for %s", ErrCorrupt, d)
		}
		// The zstd decoder takes input ending at a frame boundary for a
		// clean end, so a cut stream would look like empty (corrupt)
		// content: tell a cut from corruption by the stream's own error.
		body := &cutReader{r: br}
		payload := io.LimitReader(body, length)
		var r io.Reader = payload
		switch hdr[0] {
		case proxy.FrameRaw:
			if length != size {
				return got, fmt.Errorf("%w: raw frame of %s has %d bytes for size %d", ErrCorrupt, d, length, size)
			}
		case proxy.FrameZstd:
			if dec == nil {
				if dec, err = zstd.NewReader(nil, zstd.WithDecoderConcurrency(1)); err != nil {
					return got, err
				}
			}
			if err := dec.Reset(payload); err != nil {
				return got, fmt.Errorf("%w: zstd frame of %s: %w", ErrCorrupt, d, err)
			}
			r = io.LimitReader(dec, size+1)
		default:
			return got, fmt.Errorf("%w: unknown frame encoding %d", ErrCorrupt, hdr[0])
		}
		n, err := b.PutExpected(ctx, d, r)
		if err != nil {
			if body.err != nil {
				return got, fmt.Errorf("objects stream cut in object %s: %w", d, body.err)
			}
			if errors.Is(err, cas.ErrDigestMismatch) {
				return got, fmt.Errorf("%w: object %s: %w", ErrCorrupt, d, err)
			}
			return got, fmt.Errorf("object %s: %w", d, err)
		}
		if n != size {
			if body.err != nil {
				return got, fmt.Errorf("objects stream cut in object %s: %w", d, body.err)
			}
			return got, fmt.Errorf("%w: object %s has %d bytes, frame said %d", ErrCorrupt, d, n, size)
		}
		// Skip what the decoder did not consume (none for a well-formed frame).
		if _, err := io.Copy(io.Discard, payload); err != nil {
			return got, fmt.Errorf("objects stream cut: %w", err)
		}
		delete(asked, d)
		got = append(got, d)
		st.Objects++
		st.Bytes += n
	}
}

// cutReader remembers the error (EOF included: the frame said more bytes
// follow) that ended a frame's payload early.
type cutReader struct {
	r   io.Reader
	err error
}

func (c *cutReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	if err != nil && c.err == nil {
		c.err = err
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
	}
	return n, err
}
