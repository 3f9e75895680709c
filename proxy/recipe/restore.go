package recipe

import (
	"context"
	"errors"
	"fmt"
	"hash"
	"io"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
)

// Restore writes the blob to w, verified, and is safe to stream to a client:
// w receives bytes as they are produced (in parallel chunks when the recipe
// has checkpoints, each checked against its CRC before it is written), but
// the last byte only after the whole blob matched want. On any error w has
// received an incomplete blob, never a wrong complete one.
//
// open returns the layer's tar; it is called again when the chunked path
// fails (a damaged checkpoint), and the blob is then finished by one
// sequential run that skips what was already written.
func (r *Recipe) Restore(ctx context.Context, w io.Writer, open func() (io.ReadCloser, error), want digest.Digest) error {
	if err := r.validate(); err != nil {
		return fmt.Errorf("recipe: restore: %w", err)
	}
	if err := want.Validate(); err != nil {
		return fmt.Errorf("recipe: restore: %w", err)
	}
	hw := &holdWriter{w: w, h: want.Algorithm().Hash(), limit: r.size}
	var done int64
	if r.chunked() {
		err := r.withTar(open, func(tar io.Reader) error {
			var err error
			done, err = r.applyChunked(ctx, hw, tar)
			return err
		})
		if err == nil {
			return hw.finish(r, want)
		}
		if !errors.Is(err, errChunk) || ctx.Err() != nil {
			return fmt.Errorf("recipe: restore %s: %w", r.Encoder(), err)
		}
		log.G(ctx).WithError(err).WithField("digest", want).WithField("written", done).
			Warn("recipe: parallel restore failed (damaged checkpoints?): finishing sequentially")
	}
	err := r.withTar(open, func(tar io.Reader) error {
		sw := &skipWriter{w: hw, skip: done}
		if r.chunked() {
			return r.applyGoflate(ctx, sw, tar)
		}
		return r.applySequential(ctx, sw, tar)
	})
	if err != nil {
		return fmt.Errorf("recipe: restore %s: %w", r.Encoder(), err)
	}
	return hw.finish(r, want)
}

func (r *Recipe) withTar(open func() (io.ReadCloser, error), f func(io.Reader) error) error {
	rc, err := open()
	if err != nil {
		return fmt.Errorf("opening tar: %w", err)
	}
	defer rc.Close()
	return f(rc)
}

// holdWriter hashes everything and passes all but the last byte on, and
// nothing beyond the blob's size: a client told Content-Length never gets
// a complete body that did not verify.
type holdWriter struct {
	w       io.Writer
	h       hash.Hash
	limit   int64 // 0: unknown
	n       int64
	held    byte
	holding bool
}

func (h *holdWriter) Write(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if h.limit > 0 && h.n+int64(len(p)) > h.limit {
		return 0, fmt.Errorf("output exceeds the blob's %d bytes", h.limit)
	}
	h.h.Write(p)
	h.n += int64(len(p))
	if h.holding {
		if _, err := h.w.Write([]byte{h.held}); err != nil {
			return 0, err
		}
	}
	if _, err := h.w.Write(p[:len(p)-1]); err != nil {
		return 0, err
	}
	h.held, h.holding = p[len(p)-1], true
	return len(p), nil
}

// finish writes the last byte if the blob is complete and matches want.
func (h *holdWriter) finish(r *Recipe, want digest.Digest) error {
	if r.size != 0 && h.n != r.size {
		return fmt.Errorf("recipe: restore %s: produced %d bytes, want %d", r.Encoder(), h.n, r.size)
	}
	if got := digest.NewDigest(want.Algorithm(), h.h); got != want {
		return fmt.Errorf("recipe: restore %s: output %s does not match %s", r.Encoder(), got, want)
	}
	if h.holding {
		if _, err := h.w.Write([]byte{h.held}); err != nil {
			return err
		}
	}
	return nil
}

// SkipWriter returns a writer that drops the first skip bytes written to
// it and passes the rest to w (resuming a stream at an offset).
func SkipWriter(w io.Writer, skip int64) io.Writer { return &skipWriter{w: w, skip: skip} }

// skipWriter drops the first skip bytes (already written by a failed
// chunked run, each verified by its chunk CRC).
type skipWriter struct {
	w    io.Writer
	skip int64
}

func (s *skipWriter) Write(p []byte) (int, error) {
	n := len(p)
	if s.skip >= int64(n) {
		s.skip -= int64(n)
		return n, nil
	}
	p = p[s.skip:]
	s.skip = 0
	_, err := s.w.Write(p)
	return n, err
}
