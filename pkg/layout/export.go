package layout

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"sync"

	"github.com/opencontainers/go-digest"

	"github.com/dupsnap/dupsnap/pkg/cas"
)

const (
	exportChunk   = 1 << 20
	exportBuffers = 4
)

// xchunk is one piece of the rebuilt tar. The reader goroutine fills data
// chunks from objects; the writer hashes them and, at the object's last
// chunk, checks the digest.
type xchunk struct {
	data  []byte
	buf   *[]byte       // pooled buffer to give back, nil for manifest bytes
	obj   digest.Digest // set on the last chunk of an object
	entry int
	err   error
}

// Export writes the exact uncompressed tar of m; every object is verified
// against its digest while streamed (the error wraps cas.ErrDigestMismatch;
// bytes before the bad object have been written by then). Reading objects
// and hashing+writing run in two goroutines, so on two cores the export
// goes at about the sha256 rate.
func Export(ctx context.Context, src Source, m *Manifest, w io.Writer) error {
	return export(ctx, src, m, w, true)
}

// export is Export; verify=false trusts src's objects (Verify: the caller's
// store verified them when storing them) and saves a hash pass.
func export(ctx context.Context, src Source, m *Manifest, w io.Writer, verify bool) error {
	if len(m.raw.segs) != len(m.Entries) {
		return fmt.Errorf("layout: manifest %s has no tar data (%d segments, %d entries)", m.DiffID, len(m.raw.segs), len(m.Entries))
	}
	parent := ctx
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	free := make(chan *[]byte, exportBuffers)
	for i := 0; i < exportBuffers; i++ {
		b := make([]byte, exportChunk)
		free <- &b
	}
	out := make(chan xchunk, exportBuffers+2)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer close(out)
		produceExport(ctx, src, m, free, out)
	}()
	err := consumeExport(m, w, free, out, verify)
	cancel()
	for range out { // let the producer finish
	}
	wg.Wait()
	if err == nil {
		// The producer stops silently when the caller's ctx ends.
		err = parent.Err()
	}
	return err
}

func consumeExport(m *Manifest, w io.Writer, free chan *[]byte, out chan xchunk, verify bool) error {
	var h hash.Hash = sha256.New()
	var sum [sha256.Size]byte
	for c := range out {
		if c.err != nil {
			return c.err
		}
		if len(c.data) > 0 {
			if c.buf != nil && verify {
				h.Write(c.data)
			}
			if _, err := w.Write(c.data); err != nil {
				return err
			}
		}
		if c.buf != nil {
			free <- c.buf
		}
		if c.obj != "" && verify {
			got := digest.NewDigestFromBytes(digest.SHA256, h.Sum(sum[:0]))
			h.Reset()
			if got != c.obj {
				return fmt.Errorf("export %s: entry %q: object %s: %w: content hashes to %s", m.DiffID, m.Entries[c.entry].Path, c.obj, cas.ErrDigestMismatch, got)
			}
		}
	}
	return nil
}

func produceExport(ctx context.Context, src Source, m *Manifest, free chan *[]byte, out chan xchunk) {
	send := func(c xchunk) bool {
		select {
		case out <- c:
			return true
		case <-ctx.Done():
			return false
		}
	}
	for i := range m.Entries {
		if i&255 == 0 && ctx.Err() != nil {
			send(xchunk{err: ctx.Err()})
			return
		}
		seg := &m.raw.segs[i]
		if len(seg.hdr) > 0 && !send(xchunk{data: seg.hdr}) {
			return
		}
		if seg.paySize == 0 {
			continue
		}
		d := seg.payDigest
		if d == "" {
			d = m.Entries[i].Digest
		}
		if err := readObject(ctx, src, d, seg.paySize, i, free, send); err != nil {
			send(xchunk{err: fmt.Errorf("export %s: entry %q: %w", m.DiffID, m.Entries[i].Path, err)})
			return
		}
	}
	if len(m.raw.tail) > 0 {
		send(xchunk{data: m.raw.tail})
	}
}

// readObject sends object d (size bytes) as chunks, the last one marked.
func readObject(ctx context.Context, src Source, d digest.Digest, size int64, entry int, free chan *[]byte, send func(xchunk) bool) error {
	if d.Algorithm() != digest.SHA256 {
		return fmt.Errorf("object %s: unsupported digest", d)
	}
	rc, err := src.Open(d)
	if err != nil {
		return fmt.Errorf("object %s: %w", d, err)
	}
	defer rc.Close()
	var n int64
	for n < size {
		var bp *[]byte
		select {
		case bp = <-free:
		case <-ctx.Done():
			return ctx.Err()
		}
		want := min(int64(len(*bp)), size-n)
		k, err := io.ReadFull(rc, (*bp)[:want])
		n += int64(k)
		if err != nil {
			free <- bp
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return fmt.Errorf("object %s: %w: %d of %d bytes", d, cas.ErrDigestMismatch, n, size)
			}
			return fmt.Errorf("object %s: %w", d, err)
		}
		c := xchunk{data: (*bp)[:k], buf: bp, entry: entry}
		if n == size {
			// The object must end here too, else it is not the content we named.
			var one [1]byte
			if k, _ := rc.Read(one[:]); k > 0 {
				free <- bp
				return fmt.Errorf("object %s: %w: longer than %d bytes", d, cas.ErrDigestMismatch, size)
			}
			c.obj = d
		}
		if !send(c) {
			return ctx.Err()
		}
	}
	return nil
}
