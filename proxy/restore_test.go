package proxy_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/dupsnap/dupsnap/proxy"
	"github.com/dupsnap/dupsnap/proxy/proxytest"
	"github.com/dupsnap/dupsnap/proxy/recipe"
)

// A cold GET of a recipe-restored gzip layer (with checkpoints: parallel
// restore) streams while the layer is rebuilt; concurrent cold GETs share
// the restore and all get the exact blob. When the store is damaged so that
// the rebuilt blob is wrong near its end, clients get a cut-short body,
// never a complete 200 that does not hash to the digest, and nothing is
// cached.
func TestColdRestoreStreamsVerified(t *testing.T) {
	up := proxytest.StartUpstream(t)
	fs := files("cold", "app", 40, 48<<10) // ~2 MiB of tar: several chunks
	tail := make([]byte, 64<<10)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range tail {
		tail[i] = byte(rng.Uint32()) // incompressible: stored raw in the CAS
	}
	fs = append(fs, proxytest.File{Name: "app/zz-last", Body: tail})
	img := up.PushImage(t, "apps/cold", "v1", []proxytest.Layer{{Files: fs, Format: proxytest.Gzip}})
	l := img.Layers[0]
	want := img.Blobs[l.Digest]
	root, cache := t.TempDir(), t.TempDir()
	p := proxytest.StartProxy(t, proxy.Config{Upstream: up.URL, Root: root, CacheDir: cache})
	pullGGCR(t, p.Host, img)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	if err := p.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if st, err := p.Stats(ctx); err != nil || st.RecipeLayers != 1 || st.ParallelRecipes != 1 {
		t.Fatalf("want a recipe layer with checkpoints: %+v %v", st, err)
	}
	restart := func() *proxytest.Proxy {
		p.Stop()
		if err := os.RemoveAll(cache); err != nil {
			t.Fatal(err)
		}
		p = proxytest.StartProxy(t, proxy.Config{Upstream: up.URL, Root: root, CacheDir: cache, Predict: new(bool)})
		return p
	}
	url := func() string { return p.URL + "/v2/" + img.Repo + "/blobs/" + l.Digest.String() }

	restart()
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := (&http.Client{Timeout: time.Minute}).Get(url())
			if err != nil {
				errs <- err
				return
			}
			defer resp.Body.Close()
			b, err := io.ReadAll(resp.Body)
			if err != nil || resp.StatusCode != 200 || !bytes.Equal(b, want) {
				errs <- fmt.Errorf("cold GET: %s, %d bytes (want %d), %v", resp.Status, len(b), len(want), err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if resp, b := get(t, url(), map[string]string{"Range": "bytes=5-9"}); resp.StatusCode != http.StatusPartialContent || !bytes.Equal(b, want[5:10]) {
		t.Fatalf("range after a streamed restore: %s %q", resp.Status, b)
	}

	// Damage the last file's object: first so that it still decodes, to
	// different bytes of the same size (the tar is wrong 32 KiB before its
	// end: chunk checksum, sequential fallback, digest mismatch), then so
	// that it does not decode (the export fails mid-stream).
	sum := sha256.Sum256(tail)
	objs, _ := filepath.Glob(filepath.Join(root, "cas", "objects", "sha256", "*", hex.EncodeToString(sum[:])+".zst"))
	if len(objs) != 1 {
		t.Fatalf("object of the last file: %v", objs)
	}
	orig, err := os.ReadFile(objs[0])
	if err != nil {
		t.Fatal(err)
	}
	bad := bytes.Clone(tail)
	bad[len(bad)/2] ^= 0xff
	enc, _ := zstd.NewWriter(nil)
	wrong := enc.EncodeAll(bad, bytes.Clone(orig[:24])) // pkg/cas's 24-byte header, then a frame
	enc.Close()
	undecodable := bytes.Clone(orig)
	undecodable[len(undecodable)/2] ^= 0xff
	for round, obj := range [][]byte{wrong, undecodable} {
		if err := os.WriteFile(objs[0], obj, 0o644); err != nil {
			t.Fatal(err)
		}
		restart()
		resp, err := (&http.Client{Timeout: time.Minute}).Get(url())
		if err != nil {
			t.Fatal(err)
		}
		got, rerr := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode == 200 && rerr == nil && len(got) == len(want) {
			t.Fatalf("round %d: a damaged restore was served as a complete 200 body", round)
		}
		if !bytes.HasPrefix(want, got) && resp.StatusCode == 200 {
			t.Fatalf("round %d: streamed bytes are not a prefix of the blob", round)
		}
		t.Logf("round %d: %s, %d of %d bytes, read error %v", round, resp.Status, len(got), len(want), rerr)
		if ents, _ := filepath.Glob(filepath.Join(cache, "sha256", "*")); len(ents) != 0 {
			t.Fatalf("damaged restore cached: %v", ents)
		}
	}
}

// A recipe stored before checkpoints existed (version 1) restores
// sequentially, and that restore upgrades it: the record then holds
// checkpoints, and the next cold restore (parallel) is still exact.
func TestVersion1RecipeUpgraded(t *testing.T) {
	up := proxytest.StartUpstream(t)
	img := up.PushImage(t, "apps/old", "v1", []proxytest.Layer{{Files: files("old", "srv", 40, 48<<10), Format: proxytest.Gzip}})
	l := img.Layers[0]
	want := img.Blobs[l.Digest]
	root, cache := t.TempDir(), t.TempDir()
	p := proxytest.StartProxy(t, proxy.Config{Upstream: up.URL, Root: root, CacheDir: cache})
	pullGGCR(t, p.Host, img)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	if err := p.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	recPath := filepath.Join(root, "meta", "layers", "sha256", l.Digest.Encoded())
	readRecipe := func() (map[string]any, *recipe.Recipe) {
		b, err := os.ReadFile(recPath)
		if err != nil {
			t.Fatal(err)
		}
		var rec map[string]any
		if err := json.Unmarshal(b, &rec); err != nil {
			t.Fatal(err)
		}
		raw, err := base64.StdEncoding.DecodeString(rec["recipe"].(string))
		if err != nil {
			t.Fatal(err)
		}
		r, err := recipe.Unmarshal(raw)
		if err != nil {
			t.Fatal(err)
		}
		return rec, r
	}
	rec, r := readRecipe()
	if r.Chunks() < 2 {
		t.Fatalf("ingest gave no checkpoints: %d chunks", r.Chunks())
	}
	v1, err := r.Sequential().Marshal()
	if err != nil {
		t.Fatal(err)
	}
	rec["recipe"] = base64.StdEncoding.EncodeToString(v1)
	b, _ := json.Marshal(rec)
	if err := os.WriteFile(recPath, b, 0o644); err != nil {
		t.Fatal(err)
	}
	for round := range 2 {
		p.Stop()
		if err := os.RemoveAll(cache); err != nil {
			t.Fatal(err)
		}
		p = proxytest.StartProxy(t, proxy.Config{Upstream: up.URL, Root: root, CacheDir: cache, Predict: new(bool)})
		resp, body := get(t, p.URL+"/v2/"+img.Repo+"/blobs/"+l.Digest.String(), nil)
		if resp.StatusCode != 200 || !bytes.Equal(body, want) {
			t.Fatalf("round %d: cold GET %s, %d bytes", round, resp.Status, len(body))
		}
		if err := p.Flush(ctx); err != nil {
			t.Fatal(err)
		}
		if _, r := readRecipe(); r.Chunks() < 2 {
			t.Fatalf("round %d: recipe not upgraded (%d chunks)", round, r.Chunks())
		}
	}
}
