package offload

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"

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

// verifyAndStore rebuilds the layer's tar from the received manifest and
// the objects (each verified as it is read), and ingests that stream into
// the node CAS with the node's own parser. The stored manifest is the one
// derived from the bytes, never the received one: a manifest whose entries
// disagree with its own tar data (e.g. a changed mode that the tar hash
// alone would not catch) is refused. Only when the tar hashes to the
// diffID of the digest-verified image config is anything committed.
func (f *Fetcher) verifyAndStore(ctx context.Context, l *client.Layer, src union, layers *layout.Store) error {
	node := layers.CAS()
	release, err := node.Lease(ctx)
	if err != nil {
		return err
	}
	defer release()

	pr, pw := io.Pipe()
	expCh := make(chan error, 1)
	go func() {
		err := layout.Export(ctx, src, l.Manifest, pw)
		pw.CloseWithError(err)
		expCh <- err
	}()
	b := node.NewBatch()
	m, err := layout.Ingest(ctx, b, pr, layout.IngestOptions{MaxSize: l.Manifest.Size + 1})
	pr.CloseWithError(errors.New("offload: ingest ended"))
	expErr := <-expCh
	if err == nil && expErr != nil {
		err = expErr
	}
	if err == nil {
		err = sameManifest(l.Manifest, m)
	}
	if err != nil {
		b.Abort()
		if errors.Is(err, cas.ErrDigestMismatch) || errors.Is(err, layout.ErrInvalidLayer) || errors.Is(expErr, cas.ErrDigestMismatch) {
			err = fmt.Errorf("%w: %w", ErrCorrupt, err)
		}
		return err
	}
	if err := b.Commit(ctx); err != nil {
		return fmt.Errorf("offload: committing objects: %w", err)
	}
	if !layers.Has(m.DiffID) {
		if err := layers.Put(ctx, m); err != nil {
			return fmt.Errorf("offload: storing manifest: %w", err)
		}
	}
	log.G(ctx).WithField("entries", len(m.Entries)).Debug("offload: layer verified and stored")
	return nil
}

// sameManifest checks that the tar rebuilt from want hashed to want's
// diffID and that want says exactly what the tar says.
func sameManifest(want, got *layout.Manifest) error {
	if got.DiffID != want.DiffID || got.Size != want.Size {
		return fmt.Errorf("%w: rebuilt tar hashes to %s (%d bytes), want %s (%d bytes)", ErrCorrupt, got.DiffID, got.Size, want.DiffID, want.Size)
	}
	a, err := want.Marshal()
	if err != nil {
		return err
	}
	b, err := got.Marshal()
	if err != nil {
		return err
	}
	if !bytes.Equal(a, b) {
		return fmt.Errorf("%w: manifest entries disagree with the layer's tar data", ErrCorrupt)
	}
	return nil
}
