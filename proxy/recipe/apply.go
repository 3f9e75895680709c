package recipe

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"io"

	"github.com/dupsnap/dupsnap/proxy/recipe/internal/goflate"
)

// Apply compresses tar into w, producing the original blob bytes.
// The caller must still verify the digest of what it serves.
func (r *Recipe) Apply(ctx context.Context, w io.Writer, tar io.Reader) error {
	if err := r.validate(); err != nil {
		return fmt.Errorf("recipe: apply: %w", err)
	}
	if r.chunked() {
		if _, err := r.applyChunked(ctx, w, tar); err != nil {
			return fmt.Errorf("recipe: apply %s in %d chunks: %w", r.Encoder(), r.Chunks(), err)
		}
		return nil
	}
	return r.applySequential(ctx, w, tar)
}

// applySequential runs the recipe's encoder once over the whole tar.
func (r *Recipe) applySequential(ctx context.Context, w io.Writer, tar io.Reader) error {
	bw := bufio.NewWriterSize(w, 256<<10)
	enc, err := r.newEncoder(bw)
	if err != nil {
		return fmt.Errorf("recipe: apply: %w", err)
	}
	if _, err := io.CopyBuffer(enc, ctxReader{ctx, tar}, make([]byte, 256<<10)); err != nil {
		return fmt.Errorf("recipe: apply %s: %w", r.Encoder(), err)
	}
	if err := enc.Close(); err != nil {
		return fmt.Errorf("recipe: apply %s: close: %w", r.Encoder(), err)
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("recipe: apply %s: %w", r.Encoder(), err)
	}
	return nil
}

// applyGoflate is the sequential run of a recipe with checkpoints: goflate,
// which ingest proved reproduces the blob whatever the read sizes (its
// window handling does not depend on them), rather than compress/flate.
func (r *Recipe) applyGoflate(ctx context.Context, w io.Writer, tar io.Reader) error {
	bw := bufio.NewWriterSize(w, 256<<10)
	if _, err := bw.Write(r.header); err != nil {
		return err
	}
	c, err := goflate.NewCapture(bw, r.level, 1<<62)
	if err != nil {
		return err
	}
	crc := crc32.NewIEEE()
	n, err := io.CopyBuffer(io.MultiWriter(c, crc), ctxReader{ctx, tar}, make([]byte, 256<<10))
	if err != nil {
		return err
	}
	if err := c.Close(); err != nil {
		return err
	}
	var t [8]byte
	binary.LittleEndian.PutUint32(t[:4], crc.Sum32())
	binary.LittleEndian.PutUint32(t[4:], uint32(n))
	if _, err := bw.Write(t[:]); err != nil {
		return err
	}
	return bw.Flush()
}
