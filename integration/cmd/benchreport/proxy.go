package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"

	"github.com/dupsnap/dupsnap/integration/harness/stack"
	"github.com/dupsnap/dupsnap/pkg/cas"
	"github.com/dupsnap/dupsnap/pkg/layout"
	"github.com/dupsnap/dupsnap/proxy/client"
)

type blobRef struct {
	repo string
	dig  string
	size int64
}

func layerBlobs(set []*stack.Image) ([]blobRef, error) {
	var out []blobRef
	seen := map[string]bool{}
	for _, im := range set {
		ls, err := im.Img.Layers()
		if err != nil {
			return nil, err
		}
		for _, l := range ls {
			d, err := l.Digest()
			if err != nil {
				return nil, err
			}
			sz, _ := l.Size()
			if !seen[d.String()] {
				seen[d.String()] = true
				out = append(out, blobRef{repo: repoOnly(im.Repo), dig: d.String(), size: sz})
			}
		}
	}
	return out, nil
}

func repoOnly(repoTag string) string {
	for i := len(repoTag) - 1; i >= 0; i-- {
		if repoTag[i] == ':' {
			return repoTag[:i]
		}
	}
	return repoTag
}

// getBlob GETs a blob and returns the time until its last byte and its size.
func getBlob(ctx context.Context, host string, b blobRef) (time.Duration, int64, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+host+"/v2/"+b.repo+"/blobs/"+b.dig, nil)
	t0 := time.Now()
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, 0, err
	}
	defer resp.Body.Close()
	n, err := io.Copy(io.Discard, resp.Body)
	d := time.Since(t0)
	if err != nil {
		return 0, 0, err
	}
	if resp.StatusCode != http.StatusOK {
		return 0, 0, fmt.Errorf("GET %s from %s: %s", b.dig, host, resp.Status)
	}
	return d, n, nil
}

// benchProxy is issue 5, against the plain upstream registry serving the
// same images in the same run.
func benchProxy(ctx context.Context, rs *Results, rt *stack.RegTier, set []*stack.Image, reps int, scratch string, logf func(string, ...any)) {
	const (
		store = "store bytes (image set with shared files)"
		get   = "blob GET p50 latency (restore cache warm)"
		cold  = "cold restore of a gzip layer (empty restore cache)"
		dedup = "dedup-API bytes, image whose files the client mostly has"
	)
	if !rt.ProxyUp() {
		for _, n := range []string{store, get, cold, dedup} {
			rs.NA(5, n, "", "", nil, "dupproxy not running: "+rt.ProxyErr)
		}
		return
	}
	if st, err := rt.ProxyStats(ctx); err != nil {
		rs.NA(5, store, "MiB", "upstream registry blob bytes", ratioGoal("<=", 0.65), err.Error())
	} else {
		phys, _ := st["physicalBytes"].(float64)
		rs.Add(5, store, "MiB", "upstream registry blob bytes", ratioGoal("<=", 0.65), phys/(1<<20), float64(rt.RegistryBlobBytes())/(1<<20))
		logf("  store: dupproxy %s vs registry %s", stack.MiB(int64(phys)), stack.MiB(rt.RegistryBlobBytes()))
	}
	if !rt.ProxyUp() {
		logf("  dupproxy did not come back after stats: %s", rt.ProxyErr)
		return
	}
	blobs, err := layerBlobs(set)
	if err != nil {
		rs.NA(5, get, "ms", "", nil, err.Error())
		return
	}
	// p50 over every layer blob, the two servers interleaved.
	for rep := 0; rep < reps; rep++ {
		var pd, rd []float64
		for i := 0; i < 3; i++ {
			for _, b := range blobs {
				d1, _, err1 := getBlob(ctx, rt.ProxyAddr(), b)
				d2, _, err2 := getBlob(ctx, rt.Registry.Host, b)
				if err1 != nil || err2 != nil {
					rs.NA(5, get, "ms", "upstream registry", ratioGoal("<=", 1.2), fmt.Sprint(err1, err2))
					continue
				}
				pd, rd = append(pd, d1.Seconds()*1e3), append(rd, d2.Seconds()*1e3)
			}
		}
		if len(pd) > 0 {
			rs.Add(5, get, "ms", "upstream registry", ratioGoal("<=", 1.2), percentile(pd, 0.5), percentile(rd, 0.5))
			logf("  rep %d: GET p50 dupproxy %.2f ms, registry %.2f ms (%d blobs x3)", rep+1, percentile(pd, 0.5), percentile(rd, 0.5), len(blobs))
		}
	}
	// Cold restore: the largest gzip layer, restore cache emptied each time.
	big := blobs[0]
	for _, b := range blobs {
		if b.size > big.size {
			big = b
		}
	}
	for rep := 0; rep < reps; rep++ {
		rt.StopProxy()
		os.RemoveAll(rt.ProxyCache)
		if err := rt.StartProxy(ctx); err != nil {
			rt.ProxyErr = err.Error()
			rs.NA(5, cold, "MB/s", "registry GET of the same blob", absGoal(">=", 300, "MB/s"), "restart: "+err.Error())
			return
		}
		// A request that restores nothing first: the number is the restore,
		// not dupproxy's first connection.
		if resp, err := http.Get("http://" + rt.ProxyAddr() + "/v2/"); err == nil {
			resp.Body.Close()
		}
		d, n, err := getBlob(ctx, rt.ProxyAddr(), big)
		if err != nil {
			rs.NA(5, cold, "MB/s", "registry GET of the same blob", absGoal(">=", 300, "MB/s"), err.Error())
			continue
		}
		d2, n2, _ := getBlob(ctx, rt.Registry.Host, big)
		rs.Add(5, cold, "MB/s", "registry GET of the same blob", absGoal(">=", 300, "MB/s"), float64(n)/1e6/d.Seconds(), float64(n2)/1e6/d2.Seconds())
		logf("  rep %d: cold restore of %s: %.0f MB/s", rep+1, stack.MiB(n), float64(n)/1e6/d.Seconds())
	}
	rs.Note(5, cold, fmt.Sprintf("blob of %s (gzip); MB/s of blob bytes", stack.MiB(big.size)))
	if err := benchDedupAPI(ctx, rs, rt, set, scratch, logf); err != nil {
		rs.NA(5, dedup, "MiB", "manifest + missing files zstd", ratioGoal("<=", 1.1), err.Error())
	}
}

// benchDedupAPI: a client holding every file of all images but the last
// pulls the last one through the dedup API; what it receives is compared
// with the manifests plus the zstd-compressed bytes of the files it lacked.
func benchDedupAPI(ctx context.Context, rs *Results, rt *stack.RegTier, set []*stack.Image, scratch string, logf func(string, ...any)) error {
	if len(set) < 2 {
		return fmt.Errorf("needs at least 2 images")
	}
	dir, err := os.MkdirTemp(scratch, "dedupapi-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	have, err := cas.Open(dir+"/have", cas.Options{NoSync: true})
	if err != nil {
		return err
	}
	defer have.Close()
	all, err := cas.Open(dir+"/all", cas.Options{NoSync: true})
	if err != nil {
		return err
	}
	defer all.Close()
	ingest := func(c *cas.Store, im *stack.Image) ([]*layout.Manifest, error) {
		ls, err := im.Img.Layers()
		if err != nil {
			return nil, err
		}
		var ms []*layout.Manifest
		b := c.NewBatch()
		for _, l := range ls {
			rc, err := l.Uncompressed()
			if err != nil {
				return nil, err
			}
			m, err := layout.Ingest(ctx, b, rc, layout.IngestOptions{})
			rc.Close()
			if err != nil {
				b.Abort()
				return nil, err
			}
			ms = append(ms, m)
		}
		return ms, b.Commit(ctx)
	}
	for _, im := range set[:len(set)-1] {
		if _, err := ingest(have, im); err != nil {
			return err
		}
	}
	target := set[len(set)-1]
	if _, err := ingest(all, target); err != nil {
		return err
	}
	ls, err := target.Img.Layers()
	if err != nil {
		return err
	}
	cl := client.New("http://"+rt.ProxyAddr(), nil)
	enc, _ := zstd.NewWriter(nil)
	defer enc.Close()
	var wire, expect, blobBytes int64
	var missingN, total int
	b := have.NewBatch()
	for _, l := range ls {
		d, _ := l.Digest()
		sz, _ := l.Size()
		blobBytes += sz
		ld, err := cl.LayerManifest(ctx, repoOnly(target.Repo), digest.Digest(d.String()))
		if err != nil {
			b.Abort()
			return err
		}
		wire += ld.WireBytes
		expect += ld.WireBytes
		var missing []digest.Digest
		for _, o := range ld.Manifest.Objects() {
			total++
			if have.Has(o) {
				continue
			}
			missing = append(missing, o)
			rc, err := all.Open(o)
			if err != nil {
				b.Abort()
				return err
			}
			raw, err := io.ReadAll(rc)
			rc.Close()
			if err != nil {
				b.Abort()
				return err
			}
			expect += int64(len(enc.EncodeAll(raw, nil)))
		}
		missingN += len(missing)
		if len(missing) == 0 {
			continue
		}
		st, err := cl.FetchObjects(ctx, repoOnly(target.Repo), []digest.Digest{digest.Digest(d.String())}, missing, b)
		if err != nil {
			b.Abort()
			return err
		}
		wire += st.WireBytes
	}
	if err := b.Commit(ctx); err != nil {
		return err
	}
	rs.Add(5, "dedup-API bytes, image whose files the client mostly has", "MiB", "manifest + missing files zstd", ratioGoal("<=", 1.1),
		float64(wire)/(1<<20), float64(expect)/(1<<20))
	rs.Note(5, "dedup-API bytes, image whose files the client mostly has", fmt.Sprintf("%d of %d objects missing; a plain pull moves %s of layer blobs (%.2fx of that)",
		missingN, total, stack.MiB(blobBytes), float64(wire)/float64(max(blobBytes, 1))))
	logf("  dedup API: %s received for %d missing of %d objects (expected %s; layer blobs %s)", stack.MiB(wire), missingN, total, stack.MiB(expect), stack.MiB(blobBytes))
	_ = bytes.MinRead
	return nil
}
