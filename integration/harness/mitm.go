package harness

import (
	"bytes"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dupsnap/dupsnap/pkg/layout"
)

// Tamper modes of a MITM.
const (
	TamperNone     int32 = iota
	TamperObject         // flip a byte inside the first object frame's payload
	TamperManifest       // change one entry's mode in a layer manifest (checksum recomputed)
	TamperTruncate       // cut every objects stream after a few hundred bytes
)

// MITM is a man-in-the-middle HTTP proxy in front of a dupproxy: it counts
// the bytes of dedup API responses and, when told, tampers with them.
type MITM struct {
	URL  string
	Host string
	mode atomic.Int32

	mu sync.Mutex
	// Bytes received from the target per API (manifest, objects, other).
	bytes map[string]int64
	// Objects lists the object digests requested, in order.
	requests int
	srv      *http.Server
}

// StartMITM starts a MITM in front of target ("http://host:port"), closed at cleanup.
func StartMITM(t testing.TB, target string) *MITM {
	t.Helper()
	u, err := url.Parse(target)
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	m := &MITM{URL: "http://" + l.Addr().String(), Host: l.Addr().String(), bytes: map[string]int64{}}
	rp := httputil.NewSingleHostReverseProxy(u)
	rp.Transport = &http.Transport{DisableCompression: true}
	rp.ErrorLog = nil
	rp.ModifyResponse = m.modify
	m.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// dupproxy starts an objects response as soon as it has parsed the
		// request's JSON, which can be before this proxy's transport has
		// read the forwarded body to EOF. Without full duplex, net/http's
		// server then closes the request body as the first response bytes
		// go out, the transport's body write fails and it closes the
		// upstream connection: the stream was cut mid-response under load
		// (TestOffloadPull's byte accounting flake). Full duplex lets the
		// forwarded body finish.
		_ = http.NewResponseController(w).EnableFullDuplex()
		rp.ServeHTTP(w, r)
	}), ReadHeaderTimeout: 10 * time.Second}
	go m.srv.Serve(l)
	t.Cleanup(func() { m.srv.Close() })
	return m
}

// SetMode sets the tamper mode for subsequent responses.
func (m *MITM) SetMode(mode int32) { m.mode.Store(mode) }

// Bytes returns the bytes passed through for kind ("manifest", "objects").
func (m *MITM) Bytes(kind string) int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.bytes[kind]
}

// Reset zeroes the counters.
func (m *MITM) Reset() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.bytes = map[string]int64{}
	m.requests = 0
}

func kindOf(r *http.Request) string {
	p := r.URL.Path
	switch {
	case strings.HasPrefix(p, "/dedup/") && strings.HasSuffix(p, "/manifest"):
		return "manifest"
	case strings.HasPrefix(p, "/dedup/") && strings.HasSuffix(p, "/objects"):
		return "objects"
	}
	return "other"
}

func (m *MITM) modify(resp *http.Response) error {
	kind := kindOf(resp.Request)
	m.mu.Lock()
	m.requests++
	m.mu.Unlock()
	mode := m.mode.Load()
	if resp.StatusCode == http.StatusOK && kind == "manifest" && mode == TamperManifest {
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			return err
		}
		if lm, err := layout.Unmarshal(b); err == nil {
			for i := range lm.Entries {
				if lm.Entries[i].Type == layout.TypeFile {
					lm.Entries[i].Mode ^= 0o4000 // setuid: same tar bytes, different meaning
					break
				}
			}
			if nb, err := lm.Marshal(); err == nil {
				b = nb
			}
		}
		resp.Body = io.NopCloser(bytes.NewReader(b))
		resp.ContentLength = int64(len(b))
		resp.Header.Set("Content-Length", strconv.Itoa(len(b)))
	}
	var body io.Reader = resp.Body
	if resp.StatusCode == http.StatusOK && kind == "objects" {
		switch mode {
		case TamperObject:
			body = &flipReader{r: body, at: 8 + 49 + 2}
		case TamperTruncate:
			body = io.LimitReader(body, 300)
		}
	}
	resp.Body = &countBody{r: body, c: resp.Body, m: m, kind: kind}
	return nil
}

type flipReader struct {
	r   io.Reader
	at  int64
	off int64
}

func (f *flipReader) Read(p []byte) (int, error) {
	n, err := f.r.Read(p)
	if f.at >= f.off && f.at < f.off+int64(n) {
		p[f.at-f.off] ^= 0x5a
	}
	f.off += int64(n)
	return n, err
}

type countBody struct {
	r    io.Reader
	c    io.Closer
	m    *MITM
	kind string
}

func (c *countBody) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.m.mu.Lock()
	c.m.bytes[c.kind] += int64(n)
	c.m.mu.Unlock()
	if err == io.EOF {
		return n, io.EOF
	}
	return n, err
}

func (c *countBody) Close() error { return c.c.Close() }
