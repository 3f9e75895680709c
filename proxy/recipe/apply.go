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
