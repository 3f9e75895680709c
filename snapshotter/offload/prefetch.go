package offload

import (
	"context"
	"strings"
	"time"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/dupsnap/dupsnap/pkg/layout"
	"github.com/dupsnap/dupsnap/proxy/client"
)

// LabelImageLayers lists the blob digests of the layer being prepared and
// of the image's layers above it (pkg/snapshotters, with the cri.* labels).
const LabelImageLayers = "containerd.io/snapshot/cri.image-layers"

// prefetchParallel bounds the layers staged ahead at once.
const prefetchParallel = 2

// containerd prepares an image's layers one after the other (the unpacker
// calls Prepare in a loop; only apply and commit overlap), so without help
// each layer's round trips, downloads and writes would wait for the one
// below. When a layer's Prepare names the layers above it, their
// manifests and missing objects are staged in the background; their own
// Prepare then only verifies and commits. Nothing prefetched is trusted:
// staging holds objects verified against their digests, and the layer is
// verified against the diffID of its own Prepare's label as always.

// prefetched is one layer staged ahead of its Prepare.
type prefetched struct {
	done chan struct{}
	l    *client.Layer   // nil: not staged (then the Prepare fetches it itself)
	need []digest.Digest // staged objects claimed for it (released by the taker)
	st   stats           // bytes and requests spent
}

// startPrefetch stages the layers above r's in the background.
func (f *Fetcher) startPrefetch(ctx context.Context, labels map[string]string, c *client.Client, r request, layers *layout.Store) {
	list := labels[LabelImageLayers]
	if list == "" {
		return
	}
	for _, s := range strings.Split(list, ",") {
		d, err := digest.Parse(strings.TrimSpace(s))
		if err != nil || d == r.layer {
			continue
		}
		f.mu.Lock()
		_, busy := f.pre[d]
		diffID, ok := f.known[d]
		if busy || ok && layers.Has(diffID) {
			f.mu.Unlock()
			continue
		}
		p := &prefetched{done: make(chan struct{})}
		f.pre[d] = p
		f.mu.Unlock()
		pctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), f.cfg.Timeout)
		go func() {
			defer cancel()
			f.prefetch(pctx, c, r.repo, d, p, layers)
			// Nobody asked for it in time (pull aborted, or the layer was
			// already on the node): drop its claims.
			time.AfterFunc(f.cfg.Timeout, func() { f.expire(d, p) })
		}()
	}
}

func (f *Fetcher) prefetch(ctx context.Context, c *client.Client, repo string, d digest.Digest, p *prefetched, layers *layout.Store) {
	defer close(p.done)
	// Counted at once: the bytes are spent whether or not a Prepare takes it.
	defer func() { f.countSpent(p.st) }()
	select {
	case f.preSem <- struct{}{}:
		defer func() { <-f.preSem }()
	case <-ctx.Done():
		return
	}
	start := time.Now()
	l, err := c.LayerManifest(ctx, repo, d)
	if err != nil {
		log.G(ctx).WithError(err).WithField("layer", d).Debug("offload: prefetching manifest")
		return
	}
	p.st.manifestBytes += l.WireBytes
	p.st.tManifest = time.Since(start)
	if layers.Has(l.DiffID) {
		p.l = l
		return
	}
	node := layers.CAS()
	stg, err := f.stagingStore(node)
	if err != nil {
		return
	}
	t0 := time.Now()
	p.need, err = f.stage(ctx, c, repo, l, node, stg, &p.st)
	p.st.tObjects = time.Since(t0)
	if err != nil {
		log.G(ctx).WithError(err).WithField("layer", d).Debug("offload: prefetching objects")
		return
	}
	p.l = l
}

// takePrefetch hands the prefetch of layer d to the caller (after waiting
// for it), who then owns its claims; want != nil takes only that one.
func (f *Fetcher) takePrefetch(ctx context.Context, d digest.Digest, want *prefetched) (*prefetched, error) {
	f.mu.Lock()
	p := f.pre[d]
	if p == nil || want != nil && p != want {
		f.mu.Unlock()
		return nil, nil
	}
	delete(f.pre, d)
	f.mu.Unlock()
	select {
	case <-p.done:
		return p, nil
	case <-ctx.Done():
		// Still running: its claims end with it.
		go func() { <-p.done; f.release(p.need, f.staging) }()
		return nil, ctx.Err()
	}
}

func (f *Fetcher) expire(d digest.Digest, p *prefetched) {
	if p, _ := f.takePrefetch(context.Background(), d, p); p != nil {
		f.release(p.need, f.staging)
	}
}

// countSpent counts a prefetch's bytes.
func (f *Fetcher) countSpent(st stats) {
	fetchedBytes.Add(float64(st.fetchedBytes))
	wireBytes.WithLabelValues("manifest").Add(float64(st.manifestBytes))
	wireBytes.WithLabelValues("objects").Add(float64(st.wireBytes))
	objectsFetched.Add(float64(st.fetched))
}

// addPrefetch notes what a prefetch spent for the layer's log line (the
// metrics counted it already).
func (st *stats) addPrefetch(o stats) {
	st.prefetchWire += o.manifestBytes + o.wireBytes
	st.requests += o.requests
	st.tManifest += o.tManifest
	st.tPrefetch = o.tObjects
}
