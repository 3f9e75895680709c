package recipe

import (
	"bufio"
	"context"
	"fmt"
	"io"
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
