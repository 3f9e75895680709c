package offload

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/reference"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sync/singleflight"

	"github.com/dupsnap/dupsnap/pkg/cas"
	"github.com/dupsnap/dupsnap/pkg/layout"
	"github.com/dupsnap/dupsnap/proxy/client"
)

// Labels containerd's unpacker passes with Prepare (core/unpack,
// pkg/snapshotters/annotations.go); the cri.* ones only when the client
// asks for remote-snapshot annotations.
const (
	LabelImageRef    = "containerd.io/snapshot/cri.image-ref"
	LabelLayerDigest = "containerd.io/snapshot/cri.layer-digest"
)

// ErrCorrupt marks a layer whose manifest or objects failed verification.
var ErrCorrupt = errors.New("offload: verification failed")

// Fetcher pulls layers from dupproxy into a node's stores. Safe for
// concurrent use; concurrent fetches of one layer run once, and an object
// needed by several layers in flight is fetched once.
type Fetcher struct {
	cfg   Config
	hosts docker.RegistryHosts
	src   *sourceFinder // nil without containerd address

	mu      sync.Mutex
	clients map[string]*http.Client
	objs    map[digest.Digest]*objState

	layers singleflight.Group

	// Prefetch (prefetch.go): under mu.
	pre    map[digest.Digest]*prefetched   // by layer blob digest
	known  map[digest.Digest]digest.Digest // blob digest -> diffID of layers stored
	preSem chan struct{}

	stagingOnce sync.Once
	node        *cas.Store // the node CAS staging feeds (set with staging)
	staging     *cas.Store
	stagingErr  error
}

// objState is one object in flight: done closes when its owner's fetch
// ended (it is then in staging, unless that fetch failed).
type objState struct {
	refs int
	done chan struct{}
}

// New returns a Fetcher, or nil if cfg configures no endpoint.
func New(ctx context.Context, cfg Config) (*Fetcher, error) {
	if !cfg.Enabled() {
		return nil, nil
	}
	cfg = cfg.withDefaults()
	f := &Fetcher{
		cfg:     cfg,
		hosts:   hostsFunc(ctx, cfg.HostsDir),
		clients: map[string]*http.Client{},
		objs:    map[digest.Digest]*objState{},
		pre:     map[digest.Digest]*prefetched{},
		known:   map[digest.Digest]digest.Digest{},
		preSem:  make(chan struct{}, prefetchParallel),
	}
	if cfg.ContainerdAddress != "" {
		f.src = newSourceFinder(cfg.ContainerdAddress, cfg.ContainerdNamespace)
	}
	return f, nil
}

// Close releases the containerd connection and the staging store.
func (f *Fetcher) Close() error {
	if f.src != nil {
		f.src.close()
	}
	if f.staging != nil {
		return f.staging.Close()
	}
	return nil
}

// request is what the unpack labels tell about a layer.
type request struct {
	diffID digest.Digest // from the digest-verified image config (label diff-id)
	layer  digest.Digest // blob digest, when cri.layer-digest is present
	host   string
	repo   string
}

// FetchLayer makes the layer described by the Prepare labels available in
// layers, its manifest stored under the layer's real diffID. Any error
// means the caller unpacks the layer normally; errors are already logged
// and counted.
func (f *Fetcher) FetchLayer(ctx context.Context, labels map[string]string, layers *layout.Store) error {
	diffID, err := digest.Parse(labels[snapshots.LabelSnapshotDiffID])
	if err != nil || diffID.Algorithm() != digest.SHA256 {
		return fmt.Errorf("offload: no usable diff-id label: %w", errdefs.ErrInvalidArgument)
	}
	ctx = log.WithLogger(ctx, log.G(ctx).WithField("diffid", diffID))
	if ld := labels[LabelLayerDigest]; ld != "" {
		ctx = log.WithLogger(ctx, log.G(ctx).WithField("layer", ld))
	}
	// One fetch per layer, whoever asks: the others wait for its result.
	_, err, _ = f.layers.Do(diffID.String(), func() (any, error) {
		if layers.Has(diffID) {
			return nil, nil
		}
		start := time.Now()
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), f.cfg.Timeout)
		defer cancel()
		st, err := f.fetch(ctx, labels, diffID, layers)
		f.account(ctx, st, err, time.Since(start))
		return nil, err
	})
	return err
}

// requests lists the (host, repo) candidates to ask for the layer.
func (f *Fetcher) requests(ctx context.Context, labels map[string]string, diffID digest.Digest) ([]request, error) {
	if ref := labels[LabelImageRef]; ref != "" {
		spec, err := reference.Parse(ref)
		if err != nil {
			return nil, fmt.Errorf("offload: image ref %q: %w", ref, errdefs.ErrInvalidArgument)
		}
		r := request{diffID: diffID, host: spec.Hostname(), repo: repoOf(spec)}
		if ld, err := digest.Parse(labels[LabelLayerDigest]); err == nil {
			r.layer = ld
		}
		return []request{r}, nil
	}
	if f.src == nil {
		return nil, fmt.Errorf("offload: no cri.image-ref label and no containerd address to find the repository: %w", errdefs.ErrNotFound)
	}
	srcs, err := f.src.find(ctx, diffID)
	if err != nil {
		return nil, err
	}
	var out []request
	for _, s := range srcs {
		out = append(out, request{diffID: diffID, host: s.host, repo: s.repo})
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("offload: no image config in containerd's content store lists diffID %s: %w", diffID, errdefs.ErrNotFound)
	}
	return out, nil
}

func repoOf(spec reference.Spec) string {
	l := spec.Locator
	if i := len(spec.Hostname()); i < len(l) {
		return l[i+1:]
	}
	return ""
}

// fetch asks each candidate in turn until one serves the layer.
func (f *Fetcher) fetch(ctx context.Context, labels map[string]string, diffID digest.Digest, layers *layout.Store) (stats, error) {
	reqs, err := f.requests(ctx, labels, diffID)
	if err != nil {
		return stats{}, err
	}
	var (
		st      stats
		lastErr error
	)
	for _, r := range reqs {
		tg, err := f.endpointFor(ctx, r.host)
		if err != nil {
			lastErr = err
			continue
		}
		c := client.New(tg.url, tg.http)
		c.Namespace, c.Authorization = tg.ns, tg.auth
		c.Parallel, c.BatchSize = f.cfg.Parallel, f.cfg.BatchSize
		var (
			l     *client.Layer
			fresh bool // l fetched here, not by a prefetch
		)
		t0 := time.Now()
		if r.layer != "" {
			f.startPrefetch(ctx, labels, c, r, layers)
			var p *prefetched
			if p, err = f.takePrefetch(ctx, r.layer, nil); p != nil {
				// Its claims keep the staged objects until this pull has its own.
				defer f.release(p.need, f.staging)
				st.addPrefetch(p.st)
				l = p.l
			}
			if l == nil && err == nil {
				l, err = c.LayerManifest(ctx, r.repo, r.layer)
				fresh = true
			}
		} else {
			l, err = c.LayerManifestByDiffID(ctx, r.repo, diffID)
			fresh = true
		}
		if err != nil {
			lastErr = err
			if errors.Is(err, client.ErrNotFound) {
				continue // another repository may have it
			}
			return st, err
		}
		if fresh {
			st.manifestBytes += l.WireBytes
			st.tManifest += time.Since(t0)
		}
		// The proxy must describe the layer the verified config names.
		if l.DiffID != diffID || l.Manifest.DiffID != diffID {
			return st, fmt.Errorf("%w: dupproxy answered diffID %s for %s", ErrCorrupt, l.DiffID, diffID)
		}
		ctx := log.WithLogger(ctx, log.G(ctx).WithField("layer", l.Digest).WithField("repo", r.repo))
		err = f.pull(ctx, c, r.repo, l, layers, &st)
		return st, err
	}
	return st, lastErr
}

// staging is a private CAS next to the node's where fetched objects wait
// (verified one by one) until their layer's tar is verified; nothing in it
// is visible to snapshots.
func (f *Fetcher) stagingStore(node *cas.Store) (*cas.Store, error) {
	f.stagingOnce.Do(func() {
		dir := f.cfg.StagingDir
		if dir == "" {
			dir = filepath.Join(filepath.Dir(node.Root()), "offload-staging")
		}
		f.node = node
		// Left over from a previous run: nothing in it is referenced.
		_ = os.RemoveAll(dir)
		f.staging, f.stagingErr = cas.Open(dir, cas.Options{NoSync: true})
	})
	return f.staging, f.stagingErr
}

// pull fetches the objects of l that neither the node nor staging has,
// verifies the layer and stores it.
func (f *Fetcher) pull(ctx context.Context, c *client.Client, repo string, l *client.Layer, layers *layout.Store, st *stats) error {
	node := layers.CAS()
	stg, err := f.stagingStore(node)
	if err != nil {
		return fmt.Errorf("offload: staging store: %w", err)
	}
	t0 := time.Now()
	defer func() { st.tObjects = time.Since(t0) - st.tVerify - st.tCommit }()
	need, err := f.stage(ctx, c, repo, l, node, stg, st)
	defer f.release(need, stg)
	if err != nil {
		return err
	}
	if err := f.verifyAndStore(ctx, l, union{node, stg}, layers, st); err != nil {
		return err
	}
	f.mu.Lock()
	f.known[l.Digest] = l.DiffID
	f.mu.Unlock()
	return nil
}

// stage brings every object of l the node lacks into staging, fetching
// those nobody else is fetching. It returns the objects it claimed; the
// caller releases them (also on error) once the layer is done with them.
func (f *Fetcher) stage(ctx context.Context, c *client.Client, repo string, l *client.Layer, node, stg *cas.Store, st *stats) ([]digest.Digest, error) {
	sizes := l.Manifest.ObjectSizes()
	var need []digest.Digest
	for _, d := range l.Manifest.Objects() {
		if !node.Has(d) {
			need = append(need, d)
			st.neededBytes += sizes[d]
		}
	}
	st.objects = len(l.Manifest.Objects())
	st.needed = len(need)
	mine, others := f.claim(need)

	fetchInto := func(want []digest.Digest) error {
		if len(want) == 0 {
			return nil
		}
		b := stg.NewBatch()
		fs, err := c.FetchObjects(ctx, repo, []digest.Digest{l.Digest}, want, b)
		st.wireBytes += fs.WireBytes
		st.requests += fs.Requests
		// Keep what arrived even when the fetch failed: each object was
		// verified against its digest on the way in, and whoever needs it
		// next (this layer's own Prepare after a prefetch, a layer waiting
		// on this claim) then fetches only the rest. Counted as fetched
		// only once committed to staging.
		if cerr := b.Commit(context.WithoutCancel(ctx)); cerr != nil {
			wastedObjects.Add(float64(fs.Objects))
			wastedBytes.Add(float64(fs.Bytes))
			if err == nil {
				err = fmt.Errorf("offload: staging objects: %w", cerr)
			}
		} else {
			st.fetchedBytes += fs.Bytes
			st.fetched += fs.Objects
		}
		return err
	}
	err := fetchInto(mine)
	f.finish(mine)
	if err != nil {
		return need, err
	}
	// Objects another layer's fetch claimed: wait, then take what it failed to get.
	var retry []digest.Digest
	for d, o := range others {
		select {
		case <-o.done:
		case <-ctx.Done():
			return need, ctx.Err()
		}
		if !node.Has(d) && !stg.Has(d) {
			retry = append(retry, d)
		}
	}
	return need, fetchInto(retry)
}

// claim registers interest in need: objects nobody is fetching are mine
// to fetch; the others are being fetched by a concurrent layer.
func (f *Fetcher) claim(need []digest.Digest) (mine []digest.Digest, others map[digest.Digest]*objState) {
	others = map[digest.Digest]*objState{}
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, d := range need {
		o := f.objs[d]
		if o == nil {
			o = &objState{done: make(chan struct{})}
			f.objs[d] = o
			mine = append(mine, d)
		} else {
			others[d] = o
		}
		o.refs++
	}
	return mine, others
}

func (f *Fetcher) finish(mine []digest.Digest) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, d := range mine {
		close(f.objs[d].done)
	}
}

// release drops interest; the last user of a staged object deletes it (a
// committed layer has its own copy in the node CAS).
func (f *Fetcher) release(need []digest.Digest, stg *cas.Store) {
	f.mu.Lock()
	var drop []digest.Digest
	for _, d := range need {
		o := f.objs[d]
		if o.refs--; o.refs == 0 {
			delete(f.objs, d)
			drop = append(drop, d)
		}
	}
	f.mu.Unlock()
	for _, d := range drop {
		// Fetched, and never reached the node CAS (its layer failed, or a
		// prefetch nobody took): counted apart from what was used.
		if f.node != nil && !f.node.Has(d) {
			if in, err := stg.Stat(d); err == nil {
				wastedObjects.Inc()
				wastedBytes.Add(float64(in.Size))
			}
		}
		if err := stg.Delete(d); err != nil && !errors.Is(err, cas.ErrNotFound) && !errors.Is(err, os.ErrNotExist) {
			log.L.WithError(err).WithField("object", d).Debug("offload: dropping staged object")
		}
	}
}
