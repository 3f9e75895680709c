package recipe

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"runtime"
	"sync"

	"github.com/dupsnap/dupsnap/proxy/recipe/internal/goflate"
)

// A gzip recipe of compress/flate at levels 4-9 may carry checkpoints: the
// encoder state at block boundaries every ~256 KiB of tar, recorded and
// verified at ingest. Each stretch between two checkpoints is then
// re-compressed on its own (goflate.Resume), on all cores, and the pieces
// are joined bit-exactly. Every piece is checked against a CRC of the
// blob's bytes it must produce before it is written, so a bad checkpoint
// never puts wrong bytes out; the caller falls back to one sequential run.

// chunkWindow is how much input past a checkpoint the chunk before it needs
// (a resumed compressor only works on a full 64 KiB window).
const chunkWindow = 2 * 32 << 10

// errChunk marks a failure of the chunked path that a sequential run may fix.
var errChunk = errors.New("chunked re-compression failed")

var errEnded = fmt.Errorf("%w: input ended early", errChunk)

// chunked reports whether r restores in parallel chunks.
func (r *Recipe) chunked() bool { return len(r.cps) > 0 }

// Parallel reports whether the recipe carries checkpoints, so that Restore
// re-compresses its chunks on all cores (version 2).
func (r *Recipe) Parallel() bool { return r.chunked() }

// chunkStart is the state before chunk i (0: a fresh compressor).
func (r *Recipe) chunkStart(i int) goflate.Checkpoint {
	if i == 0 {
		return goflate.Checkpoint{Length: 3}
	}
	return r.cps[i-1]
}

// chunkBytes is the number of deflate bytes chunk i puts out (the last
// partial byte is completed by the next chunk, so it belongs to it).
func (r *Recipe) chunkBytes(i int) int64 {
	if i < len(r.cps) {
		return r.cps[i].Bit/8 - r.chunkStart(i).Bit/8
	}
	return r.deflateSize() - r.chunkStart(i).Bit/8
}

// deflateSize is the size of the raw deflate stream inside the blob.
func (r *Recipe) deflateSize() int64 { return r.size - int64(len(r.header)) - 8 }

type chunkJob struct {
	i    int
	data []byte // tar from chunkStart(i).Base
	res  chan chunkResult
	// set on the last job: the gzip trailer's CRC-32 and size
	crc  uint32
	size int64
}

type chunkResult struct {
	out []byte
	err error
}

// applyChunked writes the blob to w, chunk by chunk, each verified against
// its CRC before it is written. It returns the number of bytes written,
// all of them correct, also on error.
func (r *Recipe) applyChunked(ctx context.Context, w io.Writer, tar io.Reader) (int64, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	workers := runtime.GOMAXPROCS(0)
	jobs := make(chan *chunkJob)
	order := make(chan *chunkJob, 2*workers) // bounds the chunks in flight
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range jobs {
				j.res <- r.runChunk(j)
			}
		}()
	}
	var readErr error
	go func() {
		defer close(jobs)
		defer close(order)
		readErr = r.splitTar(ctx, tar, jobs, order)
	}()
	n, err := r.joinChunks(ctx, w, order)
	if err != nil {
		cancel()
		for range order { // let the reader finish
		}
	}
	wg.Wait()
	if readErr != nil && (err == nil || errors.Is(err, errEnded)) {
		err = readErr
	}
	return n, err
}

func (r *Recipe) runChunk(j *chunkJob) chunkResult {
	var to *goflate.Checkpoint
	if j.i < len(r.cps) {
		to = &r.cps[j.i]
	}
	out := make([]byte, 0, r.chunkBytes(j.i)+16)
	buf := appendWriter{&out}
	if _, err := goflate.Resume(buf, r.level, r.chunkStart(j.i), to, j.data); err != nil {
		return chunkResult{err: fmt.Errorf("%w: chunk %d: %v", errChunk, j.i, err)}
	}
	return chunkResult{out: out}
}

type appendWriter struct{ b *[]byte }

func (a appendWriter) Write(p []byte) (int, error) {
	*a.b = append(*a.b, p...)
	return len(p), nil
}

// splitTar reads the tar once and hands each chunk its input (with the
// window before it and the lookahead after it), in order.
func (r *Recipe) splitTar(ctx context.Context, tar io.Reader, jobs, order chan<- *chunkJob) error {
	var (
		buf    []byte // tar[bufOff : bufOff+len(buf)]
		bufOff int64
		crc    uint32
		eof    bool
		rbuf   = make([]byte, 256<<10)
	)
	readTo := func(end int64) error { // end < 0: to EOF
		for !eof && (end < 0 || bufOff+int64(len(buf)) < end) {
			if err := ctx.Err(); err != nil {
				return err
			}
			n, err := tar.Read(rbuf)
			buf = append(buf, rbuf[:n]...)
			crc = crc32.Update(crc, crc32.IEEETable, rbuf[:n])
			if errors.Is(err, io.EOF) {
				eof = true
			} else if err != nil {
				return fmt.Errorf("recipe: reading tar: %w", err)
			}
		}
		return nil
	}
	n := len(r.cps) + 1
	for i := range n {
		from := r.chunkStart(i)
		end := int64(-1)
		if i < len(r.cps) {
			end = r.cps[i].Pos + chunkWindow
		}
		if err := readTo(end); err != nil {
			return err
		}
		if from.Base < bufOff || from.Base > bufOff+int64(len(buf)) {
			return fmt.Errorf("%w: tar ends at %d before chunk %d (base %d)", errChunk, bufOff+int64(len(buf)), i, from.Base)
		}
		hi := int64(len(buf))
		if end >= 0 {
			hi = min(hi, end-bufOff)
		}
		j := &chunkJob{i: i, data: append([]byte(nil), buf[from.Base-bufOff:hi]...), res: make(chan chunkResult, 1)}
		if i == n-1 {
			j.crc, j.size = crc, bufOff+int64(len(buf))
		}
		for _, ch := range []chan<- *chunkJob{order, jobs} {
			select {
			case ch <- j:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		if i+1 < n {
			nb := r.cps[i].Base
			if nb > bufOff+int64(len(buf)) {
				return fmt.Errorf("%w: tar ends at %d before chunk %d (base %d)", errChunk, bufOff+int64(len(buf)), i+1, nb)
			}
			if nb > bufOff {
				buf = append(buf[:0], buf[nb-bufOff:]...)
				bufOff = nb
			}
		}
	}
	return nil
}

// joinChunks writes the header, the chunks in order (ORing each chunk's
// first byte into the previous one's last partial byte), and the trailer.
func (r *Recipe) joinChunks(ctx context.Context, w io.Writer, order <-chan *chunkJob) (int64, error) {
	var written int64
	write := func(p []byte) error {
		n, err := w.Write(p)
		written += int64(n)
		return err
	}
	if err := write(r.header); err != nil {
		return written, err
	}
	var carry byte
	var last *chunkJob
	for j := range order {
		var res chunkResult
		select {
		case res = <-j.res:
		case <-ctx.Done():
			return written, ctx.Err()
		}
		if res.err != nil {
			return written, res.err
		}
		out := res.out
		if len(out) > 0 {
			out[0] |= carry
		}
		want := r.chunkBytes(j.i)
		if int64(len(out)) < want || (j.i == len(r.cps) && int64(len(out)) != want) {
			return written, fmt.Errorf("%w: chunk %d produced %d bytes, want %d", errChunk, j.i, len(out), want)
		}
		if j.i < len(r.cps) {
			carry = 0
			if r.cps[j.i].Bit&7 != 0 {
				carry = out[want]
			}
		}
		if crc32.Checksum(out[:want], castagnoli) != r.crcs[j.i] {
			return written, fmt.Errorf("%w: chunk %d does not match its checksum", errChunk, j.i)
		}
		if err := write(out[:want]); err != nil {
			return written, err
		}
		last = j
	}
	if last == nil || last.i != len(r.cps) {
		return written, errEnded
	}
	var t [8]byte
	binary.LittleEndian.PutUint32(t[:4], last.crc)
	binary.LittleEndian.PutUint32(t[4:], uint32(last.size))
	return written, write(t[:])
}
