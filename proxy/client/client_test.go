package client_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"

	"github.com/dupsnap/dupsnap/pkg/cas"
	"github.com/dupsnap/dupsnap/proxy"
	"github.com/dupsnap/dupsnap/proxy/client"
)

func frame(d digest.Digest, payload []byte) []byte {
	var h [49]byte
	raw, _ := hex.DecodeString(d.Encoded())
	copy(h[1:33], raw)
	binary.BigEndian.PutUint64(h[33:41], uint64(len(payload)))
	binary.BigEndian.PutUint64(h[41:49], uint64(len(payload)))
	return append(h[:], payload...)
}

// A proxy (or a man in the middle) sending wrong bytes or a cut stream: the
// client refuses wrong content and re-posts what a cut stream lacked.
func TestFetchObjectsTampered(t *testing.T) {
	good, other := []byte("good object"), []byte("evil object")
	gd := digest.FromBytes(good)
	var mode string
	var posts int
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		posts++
		w.Write([]byte(proxy.ObjectsMagic))
		switch mode {
		case "wrong":
			w.Write(frame(gd, other))
			w.Write([]byte{proxy.FrameEnd, 0, 0, 0, 0, 0, 0, 0, 1})
		case "cut-then-ok":
			if posts == 1 {
				w.Write(frame(gd, good)[:30]) // stream ends mid-frame
				return
			}
			w.Write(frame(gd, good))
			w.Write([]byte{proxy.FrameEnd, 0, 0, 0, 0, 0, 0, 0, 1})
		}
	}))
	t.Cleanup(srv.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	store, err := cas.Open(t.TempDir(), cas.Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	c := client.New(srv.URL, nil)
	layer := digest.FromString("layer")

	mode = "wrong"
	b := store.NewBatch()
	if _, err := c.FetchObjects(ctx, "r", []digest.Digest{layer}, []digest.Digest{gd}, b); !errors.Is(err, client.ErrCorrupt) {
		t.Fatalf("wrong object: %v", err)
	}
	b.Abort()
	if store.Has(gd) || store.Has(digest.FromBytes(other)) {
		t.Fatal("tampered object kept")
	}

	mode, posts = "cut-then-ok", 0
	b = store.NewBatch()
	st, err := c.FetchObjects(ctx, "r", []digest.Digest{layer}, []digest.Digest{gd}, b)
	if err != nil || st.Objects != 1 || posts != 2 {
		t.Fatalf("resume after cut: %v %+v posts=%d", err, st, posts)
	}
	if err := b.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	rc, err := store.Open(gd)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	var buf bytes.Buffer
	buf.ReadFrom(rc)
	if !bytes.Equal(buf.Bytes(), good) {
		t.Fatal("stored object differs")
	}
}

func zframe(d digest.Digest, size int, z []byte) []byte {
	var h [49]byte
	h[0] = proxy.FrameZstd
	raw, _ := hex.DecodeString(d.Encoded())
	copy(h[1:33], raw)
	binary.BigEndian.PutUint64(h[33:41], uint64(size))
	binary.BigEndian.PutUint64(h[41:49], uint64(len(z)))
	return append(h[:], z...)
}

// A stream cut inside a zstd frame's payload is a cut, not corruption:
// the zstd decoder reports input ending at a frame boundary as a clean
// end (empty content), which once made every such cut a final "corrupt"
// error, so the layer was given up and all its objects fetched again.
// Here a zstd stream made of two frames is cut at the boundary and
// at the start; the client must re-post and get the object.
func TestFetchObjectsCutInZstdFrame(t *testing.T) {
	content := bytes.Repeat([]byte("dupsnap object content "), 3000)
	d := digest.FromBytes(content)
	enc, _ := zstd.NewWriter(nil)
	half := len(content) / 2
	z1 := enc.EncodeAll(content[:half], nil)
	z := enc.EncodeAll(content[half:], append([]byte(nil), z1...))
	for _, cut := range []int{0, len(z1), len(z1) + 7} {
		posts := 0
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			posts++
			w.Write([]byte(proxy.ObjectsMagic))
			f := zframe(d, len(content), z)
			if posts == 1 {
				w.Write(f[:49+cut]) // the connection ends inside the payload
				return
			}
			w.Write(f)
			w.Write([]byte{proxy.FrameEnd, 0, 0, 0, 0, 0, 0, 0, 1})
		}))
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		store, err := cas.Open(t.TempDir(), cas.Options{NoSync: true})
		if err != nil {
			t.Fatal(err)
		}
		b := store.NewBatch()
		st, err := client.New(srv.URL, nil).FetchObjects(ctx, "r", []digest.Digest{digest.FromString("layer")}, []digest.Digest{d}, b)
		if err != nil || st.Objects != 1 || posts != 2 {
			t.Errorf("cut at payload byte %d: %v %+v posts=%d (want resumed, 2 posts)", cut, err, st, posts)
		}
		if err == nil {
			if err := b.Commit(ctx); err != nil || !store.Has(d) {
				t.Errorf("cut at %d: object not stored: %v", cut, err)
			}
		} else {
			b.Abort()
		}
		store.Close()
		cancel()
		srv.Close()
	}
}
