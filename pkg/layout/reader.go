package layout

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"sync"
	"sync/atomic"
)

// tooLarge is the error of an uncompressed stream over limit bytes.
func tooLarge(limit int64) error {
	return fmt.Errorf("%w: uncompressed layer exceeds %d bytes", errTooLarge, limit)
}

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
	// lent: buf is a slice of the source's own buffer (see lender); the
	// consumer hands it back by decrementing hashReader.lent.
	lent bool
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
	lent atomic.Int64  // lent chunks not yet consumed
	back chan struct{} // wakes a lender waiting for lent chunks (cap 1)
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
		back: make(chan struct{}, 1),
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
	if wt, ok := src.(io.WriterTo); ok {
		l := &lender{hr: hr, limit: limit}
		_, err := wt.WriteTo(l)
		l.finish(err)
		return
	}
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
				err = tooLarge(limit)
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
		if hr.cur.lent {
			if hr.lent.Add(-1) == 0 {
				select {
				case hr.back <- struct{}{}:
				default:
				}
			}
		} else if hr.cur.buf != nil {
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

// lender is the producer's side when the source can write its own buffers
// (bytes.Reader, bufio.Reader over one, the gzip and zstd decoders): big
// writes are hashed and handed to the consumer as slices of the source's
// buffer, without the copy into a chunk; Write returns only once the
// consumer is done with them (io.Writer must not retain p). Small writes
// are copied into chunks as before.
type lender struct {
	hr    *hashReader
	limit int64
	total int64
	cur   []byte // owned chunk being filled
	off   int
	err   error
}

// lendMin is the smallest write handed over without a copy: below it the
// handoff costs more than the copy.
const lendMin = 64 << 10

var errClosed = errors.New("layer reader closed")

func (l *lender) Write(p []byte) (int, error) {
	if l.err != nil {
		return 0, l.err
	}
	n, err := l.write(p)
	// p is the source's: whatever happened, wait until the consumer is done
	// with every slice of it that was lent.
	for l.hr.lent.Load() > 0 {
		select {
		case <-l.hr.back:
		case <-l.hr.done:
			l.err = errClosed
			return 0, l.err
		}
	}
	return n, err
}

func (l *lender) write(p []byte) (int, error) {
	n := len(p)
	for len(p) > 0 {
		if len(p) >= lendMin {
			if l.off > 0 && !l.flush() {
				return 0, l.err
			}
			k := min(len(p), chunkSize)
			if !l.send(chunk{buf: p[:k], n: k, lent: true}) {
				return 0, l.err
			}
			p = p[k:]
			continue
		}
		if l.cur == nil {
			select {
			case l.cur = <-l.hr.free:
				l.off = 0
			case <-l.hr.done:
				l.err = errClosed
				return 0, l.err
			}
		}
		k := copy(l.cur[l.off:], p)
		l.off += k
		p = p[k:]
		if l.off == len(l.cur) && !l.flush() {
			return 0, l.err
		}
	}
	return n, nil
}

// send hashes c's bytes and queues it for the consumer.
func (l *lender) send(c chunk) bool {
	if !l.account(c.buf[:c.n]) {
		l.err = tooLarge(l.limit)
		return false
	}
	if c.lent {
		l.hr.lent.Add(1)
	}
	select {
	case l.hr.full <- c:
		return true
	case <-l.hr.done:
		if c.lent {
			l.hr.lent.Add(-1)
		}
		l.err = errClosed
		return false
	}
}

// account hashes b and counts it; false once the stream is over the limit.
func (l *lender) account(b []byte) bool {
	l.hr.h.Write(b)
	l.total += int64(len(b))
	return l.total <= l.limit
}

func (l *lender) flush() bool {
	c := chunk{buf: l.cur, n: l.off}
	l.cur, l.off = nil, 0
	return l.send(c)
}

// finish queues what is left and the end of the stream: io.EOF, or the
// source's error, or the limit's.
func (l *lender) finish(err error) {
	if l.err == errClosed {
		return
	}
	if l.err != nil {
		err = l.err
	}
	if err == nil {
		err = io.EOF
	}
	buf, n := l.cur, 0
	if l.err == nil && l.off > 0 {
		n = l.off
		if !l.account(buf[:n]) && err == io.EOF {
			err = tooLarge(l.limit)
		}
	}
	l.hr.total = l.total
	if buf == nil {
		select {
		case buf = <-l.hr.free:
		case <-l.hr.done:
			return
		}
	}
	select {
	case l.hr.full <- chunk{buf: buf, n: n, err: err}:
	case <-l.hr.done:
	}
}
