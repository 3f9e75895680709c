package layout

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"

	"github.com/opencontainers/go-digest"

	"github.com/dupsnap/dupsnap/pkg/cas"
)

// Verify checks that the tar rebuilt from m and src's objects hashes to
// m.DiffID and that dupsnap's own tar parser derives exactly m from it:
// every entry's metadata, header bytes and payload layout. It reads every
// object once and hashes the tar once (plus the few contents that are not
// verbatim payloads, e.g. expanded sparse files); it writes nothing.
//
// src's objects are trusted to match their digests: src must have verified
// them when storing them (a CAS). Why the content digests still hold: the
// rebuilt tar is m's header bytes with, after those of entry i, exactly
// the object m names for i. The parser records every byte it reads outside
// payloads as header bytes, so once its header bytes and payload sizes equal
// m's, entry by entry, its payload of entry i is that same byte range, i.e.
// that object, and the digest it derives for it is the object's.
//
// An error for a layer that is not what m says wraps cas.ErrDigestMismatch
// or ErrInvalidLayer.
func Verify(ctx context.Context, src Source, m *Manifest) error {
	want, err := m.Marshal()
	if err != nil {
		return err
	}
	pr, pw := io.Pipe()
	expCh := make(chan error, 1)
	go func() {
		err := export(ctx, src, m, pw, false)
		pw.CloseWithError(err)
		expCh <- err
	}()
	got, err := ingest(ctx, &verifyPutter{want: m}, pr, IngestOptions{MaxSize: m.Size + 1})
	pr.CloseWithError(errors.New("layout: verify ended"))
	if expErr := <-expCh; expErr != nil && (err == nil || errors.Is(err, ErrInvalidLayer)) {
		err = expErr // the export's cause (e.g. a missing object) explains the parse error
	}
	if err != nil {
		return err
	}
	if got.DiffID != m.DiffID || got.Size != m.Size {
		return fmt.Errorf("%w: rebuilt tar hashes to %s (%d bytes), want %s (%d bytes)", cas.ErrDigestMismatch, got.DiffID, got.Size, m.DiffID, m.Size)
	}
	b, err := got.Marshal()
	if err != nil {
		return err
	}
	if string(b) != string(want) {
		return fmt.Errorf("%w: manifest %s disagrees with its own tar data", ErrInvalidLayer, m.DiffID)
	}
	return nil
}

// verifyPutter stores nothing: payloads are named by the manifest being
// verified (see Verify), other content is hashed.
type verifyPutter struct {
	want *Manifest
	buf  []byte
	h    hash.Hash
}

func (p *verifyPutter) buffer() []byte {
	if p.buf == nil {
		p.buf = make([]byte, 256<<10)
		p.h = sha256.New()
	}
	return p.buf
}

func (p *verifyPutter) Put(ctx context.Context, r io.Reader) (digest.Digest, int64, error) {
	buf := p.buffer()
	p.h.Reset()
	n, err := io.CopyBuffer(struct{ io.Writer }{p.h}, r, buf)
	if err != nil {
		return "", 0, err
	}
	return digest.NewDigestFromBytes(digest.SHA256, p.h.Sum(nil)), n, nil
}

func (p *verifyPutter) PutPayload(ctx context.Context, entry int, r io.Reader) (digest.Digest, int64, error) {
	n, err := io.CopyBuffer(io.Discard, r, p.buffer())
	if err != nil {
		return "", 0, err
	}
	if entry >= len(p.want.raw.segs) {
		return "", 0, fmt.Errorf("%w: rebuilt tar has more than the manifest's %d entries", ErrInvalidLayer, len(p.want.raw.segs))
	}
	seg := &p.want.raw.segs[entry]
	d := seg.payDigest
	if d == "" {
		d = p.want.Entries[entry].Digest
	}
	if n != seg.paySize {
		return "", 0, fmt.Errorf("%w: entry %d: payload of %d bytes, manifest says %d", ErrInvalidLayer, entry, n, seg.paySize)
	}
	return d, n, nil
}
