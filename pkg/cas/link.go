package cas

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

// Link adds object d of src to the batch without copying it: src's file is
// hard-linked into this store's tmp/ as a named temp, so Commit makes it
// durable and names it exactly like a put (never replacing an object), and
// Abort drops the link. The content is not hashed again: src must be a
// store that verified the object when storing it (e.g. a staging store
// filled with PutExpected). Where a link is impossible (another
// filesystem, the other storage format) the object is copied through
// PutExpected, which does verify it.
func (b *Batch) Link(ctx context.Context, src *Store, d digest.Digest) error {
	h, err := hexOf(d)
	if err != nil {
		return err
	}
	if b.present(d) {
		return nil
	}
	name, _, err := src.locate(d)
	if err != nil {
		return err
	}
	if strings.HasSuffix(name, zstSuffix) == b.s.opts.Compress {
		ok, err := b.link(ctx, src, name, h, d)
		if ok || err != nil {
			return err
		}
	}
	rc, err := src.Open(d)
	if err != nil {
		return err
	}
	defer rc.Close()
	_, err = b.PutExpected(ctx, d, rc)
	return err
}

// link returns false (and no error) when the file cannot be linked.
func (b *Batch) link(ctx context.Context, src *Store, name, h string, d digest.Digest) (bool, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.done {
		return false, errors.New("cas: link on a finished batch")
	}
	if _, ok := b.pending[d]; ok {
		return true, nil
	}
	if err := b.start(ctx); err != nil {
		return false, err
	}
	t := &tempObj{name: b.s.newTempName(), hex: h, fd: -1}
	if err := unix.Linkat(src.objFd, name, b.s.tmpFd, t.name, 0); err != nil {
		if errors.Is(err, unix.EXDEV) || errors.Is(err, unix.EPERM) || errors.Is(err, unix.EMLINK) {
			return false, nil
		}
		return false, fmt.Errorf("cas: link %s from %s: %w", d, src.root, err)
	}
	b.linked = append(b.linked, t)
	b.pending[d] = t
	b.order = append(b.order, t)
	return true, nil
}
