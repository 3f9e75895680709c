package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/dupsnap/dupsnap/proxy/recipe"
)

// blobFailover reads a retained blob from a remote blob store and, if the
// blob vanishes mid-read, goes on from the same offset with the layer
// rebuilt by its recipe. Why: another replica that finds a recipe for the
// layer drops the retained blob at once; a GET streaming that blob here
// would otherwise be cut. The client gets the exact bytes either way (the
// rebuilt stream is verified by writeLayer).
//
// Local blobs are not wrapped: an open file survives its unlink, and
// ServeContent can then use sendfile.
type blobFailover struct {
	ctx    context.Context
	s      *Server
	d      digest.Digest
	f      io.ReadSeekCloser
	off    int64
	alt    io.ReadCloser // the rebuilt stream, once switched
	cancel context.CancelFunc
}

func (s *Server) failover(ctx context.Context, d digest.Digest, f io.ReadSeekCloser) io.ReadSeekCloser {
	if _, ok := f.(*os.File); ok {
		return f
	}
	return &blobFailover{ctx: ctx, s: s, d: d, f: f}
}

func (b *blobFailover) Read(p []byte) (int, error) {
	if b.alt != nil {
		n, err := b.alt.Read(p)
		b.off += int64(n)
		return n, err
	}
	n, err := b.f.Read(p)
	b.off += int64(n)
	if isNotFound(err) {
		if serr := b.switchToRecipe(); serr != nil {
			return n, fmt.Errorf("%w (and no recipe to go on with: %v)", err, serr)
		}
		if n > 0 {
			return n, nil
		}
		return b.Read(p)
	}
	return n, err
}

// switchToRecipe starts the rebuilt stream at b.off, if the layer's record
// now says it is restorable without the blob.
func (b *blobFailover) switchToRecipe() error {
	rec, err := b.s.layerRecord(b.ctx, b.d)
	if err != nil {
		return err
	}
	if rec.Retained {
		return errors.New("the layer record still says the blob is retained")
	}
	ctx, cancel := context.WithCancel(b.ctx)
	pr, pw := io.Pipe()
	go func() {
		pw.CloseWithError(b.s.writeLayer(ctx, rec, recipe.SkipWriter(pw, b.off)))
	}()
	log.G(b.ctx).WithField("digest", b.d).WithField("offset", b.off).Info("retained blob vanished mid-read (replaced by a recipe): going on from the rebuilt layer")
	b.alt, b.cancel = pr, cancel
	return nil
}

func (b *blobFailover) Seek(off int64, whence int) (int64, error) {
	if b.alt != nil {
		return 0, errors.New("seek after failover")
	}
	n, err := b.f.Seek(off, whence)
	if err == nil {
		b.off = n
	}
	return n, err
}

func (b *blobFailover) Close() error {
	if b.alt != nil {
		b.cancel()
		b.alt.Close()
	}
	return b.f.Close()
}
