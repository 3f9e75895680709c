package layout

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"sync"
)

// errTooLarge marks a stream or record over its configured bound.
var errTooLarge = errors.New("over size limit")

const (
	chunkSize    = 512 << 10
	chunkBuffers = 4
)

type chunk struct {
	buf []byte
	n   int
	err error
}

// hashReader reads the uncompressed layer ahead in a goroutine that also
// hashes it (the diffID), so the diffID hash runs on one core while the tar
// parser and the per-file object hashes run on the other.
type hashReader struct {
	h     hash.Hash
	total int64 // set by the producer before the final chunk is sent

	free chan []byte
	full chan chunk
	done chan struct{}
	once sync.Once
	wg   sync.WaitGroup

	cur    chunk
	off    int
	err    error
	closed bool
}

func newHashReader(src io.Reader, limit int64) *hashReader {
	hr := &hashReader{
		h:    sha256.New(),
		free: make(chan []byte, chunkBuffers),
		full: make(chan chunk, chunkBuffers),
		done: make(chan struct{}),
	}
	for i := 0; i < chunkBuffers; i++ {
		hr.free <- make([]byte, chunkSize)
	}
	hr.wg.Add(1)
	go hr.produce(src, limit)
	return hr
}

func (hr *hashReader) produce(src io.Reader, limit int64) {
	defer hr.wg.Done()
	var total int64
	for {
		var buf []byte
		select {
		case buf = <-hr.free:
		case <-hr.done:
			return
		}
		n, err := fill(src, buf)
		if n > 0 {
			hr.h.Write(buf[:n])
			total += int64(n)
			if total > limit && err == nil {
				err = fmt.Errorf("%w: uncompressed layer exceeds %d bytes", errTooLarge, limit)
			}
		}
		if err != nil {
			hr.total = total
		}
		select {
		case hr.full <- chunk{buf: buf, n: n, err: err}:
		case <-hr.done:
			return
		}
		if err != nil {
			return
		}
	}
}

// fill reads until buf is full or src fails; unlike io.ReadFull it passes
// a decoder's own io.ErrUnexpectedEOF (truncated gzip/zstd) through.
func fill(src io.Reader, buf []byte) (int, error) {
	n, idle := 0, 0
	for n < len(buf) {
		k, err := src.Read(buf[n:])
		n += k
		if err != nil {
			return n, err
		}
		if k == 0 {
			if idle++; idle > 100 {
				return n, io.ErrNoProgress
			}
		} else {
			idle = 0
		}
	}
	return n, nil
}

func (hr *hashReader) Read(p []byte) (int, error) {
	for hr.off >= hr.cur.n {
		if hr.err != nil {
			return 0, hr.err
		}
		if hr.cur.buf != nil {
			hr.free <- hr.cur.buf
		}
		hr.cur = <-hr.full
		hr.off = 0
		if hr.cur.err != nil {
			hr.err = hr.cur.err
		}
	}
	n := copy(p, hr.cur.buf[hr.off:hr.cur.n])
	hr.off += n
	return n, nil
}

// sum returns the digest and length of everything read; valid once Read
// has returned io.EOF.
func (hr *hashReader) sum() ([]byte, int64) {
	return hr.h.Sum(nil), hr.total
}

// close stops the producer and waits for it (it may be blocked in src.Read
// until the caller closes src's decoder).
func (hr *hashReader) close() {
	hr.once.Do(func() { close(hr.done) })
	hr.wg.Wait()
}

// recorder sits between the layer stream and archive/tar: in raw mode it
// keeps every byte the tar reader consumes (headers, records, padding); in
// payload mode it only counts (and, for sparse files, spools the archived
// bytes).
type recorder struct {
	r       io.Reader
	payload bool
	pending []byte
	limit   int64
	payN    int64
	spool   io.Writer
	err     error // first error from r (other than io.EOF)
}

func (rc *recorder) Read(p []byte) (int, error) {
	n, err := rc.r.Read(p)
	if n > 0 {
		if rc.payload {
			rc.payN += int64(n)
			if rc.spool != nil {
				if _, werr := rc.spool.Write(p[:n]); werr != nil {
					return n, werr
				}
			}
		} else {
			rc.pending = append(rc.pending, p[:n]...)
			if int64(len(rc.pending)) > rc.limit {
				err = fmt.Errorf("%w: %d bytes of headers/records before one entry's data", errTooLarge, len(rc.pending))
			}
		}
	}
	if err != nil && err != io.EOF && rc.err == nil {
		rc.err = err
	}
	return n, err
}

// take returns the pending raw bytes and starts a new segment.
func (rc *recorder) take() []byte {
	b := rc.pending
	rc.pending = make([]byte, 0, 1024)
	return b
}
