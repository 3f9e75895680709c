package recipe

import (
	"context"
	"fmt"
	"io"

	"github.com/opencontainers/go-digest"
)

// ApplyVerified is Apply that also checks the output's size and digest, so a
// dependency bump that changed encoder output is caught at restore time. The
// bytes are already written to w when it fails: write to a temporary file
// and discard it on error.
func (r *Recipe) ApplyVerified(ctx context.Context, w io.Writer, tar io.Reader, want digest.Digest) error {
	if err := want.Validate(); err != nil {
		return fmt.Errorf("recipe: apply: %w", err)
	}
	v := want.Verifier()
	cw := &countWriter{w: io.MultiWriter(w, v)}
	if err := r.Apply(ctx, cw, tar); err != nil {
		return err
	}
	if r.size != 0 && cw.n != r.size {
		return fmt.Errorf("recipe: apply %s: produced %d bytes, want %d", r.Encoder(), cw.n, r.size)
	}
	if !v.Verified() {
		return fmt.Errorf("recipe: apply %s: output does not match %s", r.Encoder(), want)
	}
	return nil
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}
