package layout

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/opencontainers/go-digest"

	"github.com/dupsnap/dupsnap/pkg/cas"
)

var exportBufs = sync.Pool{New: func() any { b := make([]byte, 1<<20); return &b }}

// Export writes the exact uncompressed tar of m; every object is verified
// against its digest while streamed (the error wraps cas.ErrDigestMismatch).
func Export(ctx context.Context, src Source, m *Manifest, w io.Writer) error {
	if len(m.raw.segs) != len(m.Entries) {
		return fmt.Errorf("layout: manifest %s has no tar data (%d segments, %d entries)", m.DiffID, len(m.raw.segs), len(m.Entries))
	}
	bp := exportBufs.Get().(*[]byte)
	defer exportBufs.Put(bp)
	buf := *bp
	for i := range m.Entries {
		if i&255 == 0 {
			if err := ctx.Err(); err != nil {
				return err
			}
		}
		seg := &m.raw.segs[i]
		if len(seg.hdr) > 0 {
			if _, err := w.Write(seg.hdr); err != nil {
				return err
			}
		}
		if seg.paySize == 0 {
			continue
		}
		d := seg.payDigest
		if d == "" {
			d = m.Entries[i].Digest
		}
		if err := copyObject(src, d, seg.paySize, w, buf); err != nil {
			return fmt.Errorf("export %s: entry %q: %w", m.DiffID, m.Entries[i].Path, err)
		}
	}
	_, err := w.Write(m.raw.tail)
	return err
}

// copyObject streams object d (size bytes) to w, hashing as it goes.
func copyObject(src Source, d digest.Digest, size int64, w io.Writer, buf []byte) error {
	if d.Algorithm() != digest.SHA256 {
		return fmt.Errorf("object %s: unsupported digest", d)
	}
	rc, err := src.Open(d)
	if err != nil {
		return fmt.Errorf("object %s: %w", d, err)
	}
	defer rc.Close()
	h := sha256.New()
	var n int64
	for n < size {
		want := int64(len(buf))
		if size-n < want {
			want = size - n
		}
		k, err := io.ReadFull(rc, buf[:want])
		if k > 0 {
			h.Write(buf[:k])
			if _, werr := w.Write(buf[:k]); werr != nil {
				return werr
			}
			n += int64(k)
		}
		if err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return fmt.Errorf("object %s: %w: %d of %d bytes", d, cas.ErrDigestMismatch, n, size)
			}
			return fmt.Errorf("object %s: %w", d, err)
		}
	}
	// The object must end here too, else it is not the content we named.
	if k, _ := rc.Read(buf[:1]); k > 0 {
		return fmt.Errorf("object %s: %w: longer than %d bytes", d, cas.ErrDigestMismatch, size)
	}
	if got := digest.NewDigestFromBytes(digest.SHA256, h.Sum(nil)); got != d {
		return fmt.Errorf("object %s: %w: content hashes to %s", d, cas.ErrDigestMismatch, got)
	}
	return nil
}
