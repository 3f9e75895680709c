package recipe

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash"
	"io"

	"github.com/opencontainers/go-digest"

	"github.com/dupsnap/dupsnap/proxy/recipe/internal/goflate"
)

// prefixSize is how much tar each candidate compresses before the survivors
// get a full run: enough for several deflate blocks / zstd blocks of output.
const prefixSize = 256 << 10

var zstdMagic = []byte{0x28, 0xb5, 0x2f, 0xfd}

// Detect tries the known encoders on blob (the compressed layer) whose
// uncompressed form is given by tar (a function, since it may be called
// several times); returns (nil, nil) when none reproduces blobDigest.
//
// Cost: one compression of a 256 KiB tar prefix per plausible candidate
// (usually 1-8), then full re-compressions until one matches; a full run
// aborts at the first output byte that differs from the blob.
//
// A compress/flate recipe at levels 4-9 also gets checkpoints (parallel
// restore, see chunked.go) when a chunked re-compression reproduces the
// blob too: two more runs over the tar, one of them parallel.
func Detect(ctx context.Context, blob io.ReaderAt, blobSize int64, blobDigest digest.Digest, tar func() (io.ReadCloser, error)) (*Recipe, error) {
	r, cps, err := detect(ctx, blob, blobSize, blobDigest, tar)
	if r == nil || err != nil || cps == nil {
		return r, err
	}
	if len(cps) > 0 {
		ok, err := r.addCheckpoints(ctx, blob, blobSize, blobDigest, tar, cps)
		if err != nil || ok {
			return r, err
		}
	}
	// No checkpoints (a small layer, or chunks that did not reproduce the
	// blob): the recipe restores with compress/flate, so it must be the one
	// proven, run as restores run it.
	if ok, err := r.runFull(ctx, blob, blobSize, blobDigest, tar); err != nil || !ok {
		return nil, err
	}
	return r, nil
}

// detect finds the recipe; for a compress/flate level 4-9 candidate the full
// verifying run is goflate's capturing one, which also yields checkpoints.
func detect(ctx context.Context, blob io.ReaderAt, blobSize int64, blobDigest digest.Digest, tar func() (io.ReadCloser, error)) (*Recipe, []goflate.Checkpoint, error) {
	if err := blobDigest.Validate(); err != nil {
		return nil, nil, fmt.Errorf("recipe: detect: %w", err)
	}
	head := make([]byte, min(blobSize, int64(maxGzipHeader)))
	if _, err := blob.ReadAt(head, 0); err != nil && !errors.Is(err, io.EOF) {
		return nil, nil, fmt.Errorf("recipe: detect: read blob header: %w", err)
	}
	var cands []*Recipe
	switch {
	case len(head) >= 10 && head[0] == 0x1f && head[1] == 0x8b:
		h, err := parseGzipHeader(head)
		if err != nil {
			return nil, nil, nil // a header we cannot keep verbatim: retain the blob
		}
		cands = gzipCandidates(h, bytes.Clone(head[:h.len]), blobSize)
	case len(head) >= 6 && bytes.Equal(head[:4], zstdMagic):
		cands = zstdCandidates(head, blobSize)
	}
	if len(cands) == 0 {
		return nil, nil, nil
	}

	prefix, complete, err := readPrefix(ctx, tar)
	if err != nil {
		return nil, nil, err
	}
	var survivors []*Recipe
	for _, c := range cands {
		if err := ctx.Err(); err != nil {
			return nil, nil, fmt.Errorf("recipe: detect: %w", err)
		}
		ok, err := c.run(ctx, blob, blobSize, blobDigest, bytes.NewReader(prefix), complete)
		if err != nil {
			return nil, nil, err
		}
		if ok && complete {
			return c, nil, nil // the whole tar was the prefix: verified already
		}
		if ok {
			survivors = append(survivors, c)
		}
	}
	for _, c := range survivors {
		if c.checkpointable() {
			cps, ok, err := c.capture(ctx, blob, blobSize, blobDigest, tar)
			if err != nil {
				return nil, nil, err
			}
			if ok {
				if cps == nil {
					cps = []goflate.Checkpoint{}
				}
				return c, cps, nil
			}
		}
		ok, err := c.runFull(ctx, blob, blobSize, blobDigest, tar)
		if err != nil {
			return nil, nil, err
		}
		if ok {
			return c, nil, nil
		}
	}
	return nil, nil, nil
}

// readPrefix reads up to prefixSize bytes of tar; complete reports EOF.
func readPrefix(ctx context.Context, tar func() (io.ReadCloser, error)) ([]byte, bool, error) {
	rc, err := tar()
	if err != nil {
		return nil, false, fmt.Errorf("recipe: detect: open tar: %w", err)
	}
	defer rc.Close()
	buf := make([]byte, prefixSize+1)
	n, err := io.ReadFull(ctxReader{ctx, rc}, buf)
	switch {
	case errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF):
		return buf[:n], true, nil
	case err != nil:
		return nil, false, fmt.Errorf("recipe: detect: read tar: %w", err)
	}
	return buf[:prefixSize], false, nil
}

func (c *Recipe) runFull(ctx context.Context, blob io.ReaderAt, blobSize int64, d digest.Digest, tar func() (io.ReadCloser, error)) (bool, error) {
	rc, err := tar()
	if err != nil {
		return false, fmt.Errorf("recipe: detect: open tar: %w", err)
	}
	defer rc.Close()
	return c.run(ctx, blob, blobSize, d, rc, true)
}

// run compresses src with candidate c, comparing the output with blob as it
// is produced. With final it closes the encoder and requires the exact size
// and digest; otherwise it only requires that what came out so far matches.
func (c *Recipe) run(ctx context.Context, blob io.ReaderAt, blobSize int64, d digest.Digest, src io.Reader, final bool) (bool, error) {
	cw := &compareWriter{blob: blob, size: blobSize, h: d.Algorithm().Hash()}
	enc, err := c.newEncoder(cw)
	if err != nil {
		return false, err
	}
	_, err = io.CopyBuffer(enc, ctxReader{ctx, src}, make([]byte, 64<<10))
	if err == nil && final {
		err = enc.Close()
	}
	switch {
	case errors.Is(err, errMismatch):
		return false, nil
	case err != nil && cw.blobErr != nil:
		return false, fmt.Errorf("recipe: detect: read blob: %w", cw.blobErr)
	case err != nil:
		return false, fmt.Errorf("recipe: detect %s: %w", c.Encoder(), err)
	case !final:
		return true, nil
	}
	if cw.off != blobSize || digest.NewDigest(d.Algorithm(), cw.h) != d {
		return false, nil
	}
	return true, nil
}

var errMismatch = errors.New("output differs from blob")

// compareWriter checks written bytes against the blob at the same offset and
// hashes them, so a matching run proves the digest without a second pass.
// Encoders write in small pieces (flate: ~250 bytes), so the blob is read
// ahead in large windows rather than with one ReadAt per Write.
type compareWriter struct {
	blob    io.ReaderAt
	size    int64
	off     int64
	win     []byte // blob[winOff : winOff+len(win)]
	winOff  int64
	h       hash.Hash
	blobErr error
}

const compareWindow = 256 << 10

func (w *compareWriter) Write(p []byte) (int, error) {
	if w.off+int64(len(p)) > w.size {
		return 0, errMismatch
	}
	for q := p; len(q) > 0; {
		i := w.off - w.winOff
		if i >= int64(len(w.win)) {
			if err := w.fill(); err != nil {
				return 0, err
			}
			continue
		}
		n := min(len(q), len(w.win)-int(i))
		if !bytes.Equal(w.win[i:i+int64(n)], q[:n]) {
			return 0, errMismatch
		}
		w.h.Write(q[:n])
		w.off += int64(n)
		q = q[n:]
	}
	return len(p), nil
}

// fill loads the window starting at the current offset.
func (w *compareWriter) fill() error {
	if w.win == nil {
		w.win = make([]byte, compareWindow)
	}
	w.win = w.win[:min(int64(cap(w.win)), w.size-w.off)]
	w.winOff = w.off
	if n, err := w.blob.ReadAt(w.win, w.off); n < len(w.win) {
		w.blobErr = err
		if err == nil {
			err = io.ErrUnexpectedEOF
		}
		return fmt.Errorf("short blob read at %d: %w", w.off, err)
	}
	return nil
}

// ctxReader makes long copies stop promptly on cancellation.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (r ctxReader) Read(p []byte) (int, error) {
	if err := r.ctx.Err(); err != nil {
		return 0, err
	}
	return r.r.Read(p)
}
