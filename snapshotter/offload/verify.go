package offload

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/dupsnap/dupsnap/pkg/cas"
	"github.com/dupsnap/dupsnap/pkg/layout"
	"github.com/dupsnap/dupsnap/proxy/client"
)

// union reads objects from the node CAS, else from staging.
type union struct{ node, staging *cas.Store }

func (u union) Open(d digest.Digest) (io.ReadCloser, error) {
	rc, err := u.node.Open(d)
	if err == nil {
		return rc, nil
	}
	return u.staging.Open(d)
}

// verifyAndStore checks the received manifest against the layer's tar
// rebuilt from it and the objects (layout.Verify: the tar must hash to the
// diffID of the digest-verified image config, and dupsnap's own parser must
// derive exactly the received manifest from it, so no entry can claim a
// mode or owner its tar header does not have). Every object was verified
// against its digest when stored: fetched ones by PutExpected on arrival
// in staging, the node's when they were stored, so each is read once and
// only the tar is hashed. Then the fetched objects are hard-linked from
// staging into one batch of the node CAS (no second write) and committed
// with the manifest; on any failure nothing reaches the node.
func (f *Fetcher) verifyAndStore(ctx context.Context, l *client.Layer, src union, layers *layout.Store, st *stats) error {
	t0 := time.Now()
	node := layers.CAS()
	release, err := node.Lease(ctx)
	if err != nil {
		return err
	}
	defer release()
	if err := layout.Verify(ctx, src, l.Manifest); err != nil {
		if errors.Is(err, cas.ErrDigestMismatch) || errors.Is(err, layout.ErrInvalidLayer) {
			err = fmt.Errorf("%w: %w", ErrCorrupt, err)
		}
		return err
	}
	t1 := time.Now()
	st.tVerify = t1.Sub(t0)
	defer func() { st.tCommit = time.Since(t1) }()
	// Every object goes through the batch, present ones too: Commit then
	// also makes names durable that a concurrent batch linked but has not
	// synced yet.
	b := node.NewBatch()
	for _, d := range l.Manifest.Objects() {
		if err := b.Link(ctx, src.staging, d); err != nil {
			b.Abort()
			return fmt.Errorf("offload: adding object %s: %w", d, err)
		}
	}
	if err := b.Commit(ctx); err != nil {
		return fmt.Errorf("offload: committing objects: %w", err)
	}
	if !layers.Has(l.DiffID) {
		if err := layers.Put(ctx, l.Manifest); err != nil {
			return fmt.Errorf("offload: storing manifest: %w", err)
		}
	}
	log.G(ctx).WithField("entries", len(l.Manifest.Entries)).Debug("offload: layer verified and stored")
	return nil
}
