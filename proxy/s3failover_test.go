package proxy_test

import (
	"context"
	"crypto/sha256"
	"io"
	"math/rand"
	"net"
	"net/http"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/dupsnap/dupsnap/proxy"
	"github.com/dupsnap/dupsnap/proxy/proxytest"
)

// testS3BlobVanishesMidRead: replica B streams a retained gzip layer from
// S3 when replica A finds a recipe for it and deletes the blob, and B's S3
// connection then drops. B resumes the object, finds it gone, and goes on
// from the same offset with the layer rebuilt by its recipe: the client
// gets every byte, digest verified. (Before: the client's download was cut.)
func testS3BlobVanishesMidRead(t *testing.T, st proxy.StorageConfig) {
	up := proxytest.StartUpstream(t)
	body := make([]byte, 3<<20)
	rand.New(rand.NewSource(7)).Read(body) // incompressible: the blob is as large as the file
	img := up.PushImage(t, "race/gzip", "v1", []proxytest.Layer{{Files: []proxytest.File{{Name: "big", Body: body}}, Format: proxytest.Gzip}})
	layer := img.Layers[0]

	hold := make(chan struct{})
	var once sync.Once
	release := func() { once.Do(func() { close(hold) }) }
	proxy.SetRecipeHook(func(digest.Digest) { <-hold })

	a := proxytest.StartProxy(t, proxy.Config{Upstream: up.URL, Storage: st})
	s3u, err := url.Parse(st.S3.Endpoint)
	if err != nil {
		t.Fatal(err)
	}
	fwd := startCutter(t, s3u.Host, 256<<10)
	stB := st
	stB.S3.Endpoint = "http://" + fwd.addr()
	b := proxytest.StartProxy(t, proxy.Config{Upstream: up.URL, Storage: stB, Predict: new(bool)})
	// Cleanups run last-in first-out: the detections held in the hook are
	// let go before the proxies stop.
	t.Cleanup(func() { release(); proxy.SetRecipeHook(nil) })

	pullGGCR(t, a.Host, img) // A ingests the layer: retained until its recipe detection goes on

	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, b.URL+"/v2/"+img.Repo+"/blobs/"+layer.Digest.String(), nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET from B: %s", resp.Status)
	}
	h := sha256.New()
	n, err := io.CopyN(h, resp.Body, 64<<10)
	if err != nil {
		t.Fatal(err)
	}

	// A now finds the recipe and deletes the retained blob.
	release()
	for {
		st, err := a.Stats(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if st.RetainedLayers == 0 && st.RecipeLayers > 0 {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("A never replaced the blob by a recipe: %+v", st)
		}
		time.Sleep(50 * time.Millisecond)
	}
	// B's S3 stream (stalled by the forwarder after 256 KiB) drops.
	fwd.cut()
	m, err := io.Copy(h, resp.Body)
	n += m
	if err != nil {
		t.Fatalf("download from B cut after %d of %d bytes: %v", n, layer.Size, err)
	}
	if n != layer.Size || digest.NewDigestFromBytes(digest.SHA256, h.Sum(nil)) != layer.Digest {
		t.Fatalf("got %d bytes, digest %x; want %d bytes, %s", n, h.Sum(nil), layer.Size, layer.Digest)
	}
}

// cutter forwards TCP connections to target; each connection's replies
// stall after capB bytes until cut, which drops every open connection and
// lifts the cap for later ones.
type cutter struct {
	l      net.Listener
	target string
	mu     sync.Mutex
	conns  []net.Conn
	capB   int64
	cutCh  chan struct{}
}

func startCutter(t *testing.T, target string, capB int64) *cutter {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c := &cutter{l: l, target: target, capB: capB, cutCh: make(chan struct{})}
	t.Cleanup(func() { l.Close(); c.cut() })
	go func() {
		for {
			in, err := l.Accept()
			if err != nil {
				return
			}
			out, err := net.Dial("tcp", target)
			if err != nil {
				in.Close()
				continue
			}
			c.mu.Lock()
			c.conns = append(c.conns, in, out)
			capB, cutCh := c.capB, c.cutCh
			c.mu.Unlock()
			go func() { io.Copy(out, in); out.Close() }()
			go func() {
				if capB > 0 {
					if _, err := io.CopyN(in, out, capB); err != nil {
						in.Close()
						return
					}
					<-cutCh
				}
				io.Copy(in, out)
				in.Close()
			}()
		}
	}()
	return c
}

func (c *cutter) addr() string { return c.l.Addr().String() }

func (c *cutter) cut() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, cn := range c.conns {
		cn.Close()
	}
	c.conns = nil
	if c.capB > 0 {
		c.capB = 0
		close(c.cutCh)
	}
}
