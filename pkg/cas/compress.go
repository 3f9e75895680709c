package cas

import (
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"sync"

	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"
)

// A compressed object ("<hex>.zst") is a valid zstd stream: a 24-byte zstd
// skippable frame carrying our magic and the logical size (so Stat needs one
// pread, not a decompression), then the zstd frame(s) of the content. The
// ".zst" name, not the content, says an object is compressed: an
// uncompressed object may well start with these very bytes.
const (
	zhdrLen      = 24
	zskipMagic   = 0x184D2A5E // one of the 16 skippable-frame magics
	zpayloadLen  = 16
	zmagicString = "dupsnap\x01"
)

func putZHeader(b []byte, logical int64) {
	binary.LittleEndian.PutUint32(b[0:], zskipMagic)
	binary.LittleEndian.PutUint32(b[4:], zpayloadLen)
	copy(b[8:16], zmagicString)
	binary.LittleEndian.PutUint64(b[16:], uint64(logical))
}

func parseZHeader(b []byte) (int64, error) {
	if len(b) < zhdrLen || binary.LittleEndian.Uint32(b[0:]) != zskipMagic ||
		binary.LittleEndian.Uint32(b[4:]) != zpayloadLen || string(b[8:16]) != zmagicString {
		return 0, fmt.Errorf("cas: bad compressed object header")
	}
	n := binary.LittleEndian.Uint64(b[16:])
	if n > 1<<62 {
		return 0, fmt.Errorf("cas: bad compressed object size %d", n)
	}
	return int64(n), nil
}

// readZSize reads the logical size from a compressed object's header.
func readZSize(fd int) (int64, error) {
	var b [zhdrLen]byte
	n, err := unix.Pread(fd, b[:], 0)
	if err != nil {
		return 0, fmt.Errorf("cas: read compressed header: %w", err)
	}
	return parseZHeader(b[:n])
}

var (
	// EncodeAll/DecodeAll may be called concurrently on one coder; the
	// streaming ones are pooled (concurrency 1 = no background goroutines).
	zencAll = sync.OnceValue(func() *zstd.Encoder {
		e, _ := zstd.NewWriter(nil, zstd.WithEncoderConcurrency(1))
		return e
	})
	zencPool = sync.Pool{New: func() any {
		e, _ := zstd.NewWriter(nil, zstd.WithEncoderConcurrency(1))
		return e
	}}
	zdecPool = sync.Pool{New: func() any {
		d, _ := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1))
		return d
	}}
)

// zstdFile is an io.ReadCloser over a compressed object.
type zstdFile struct {
	f   *os.File
	dec *zstd.Decoder
}

func newZstdFile(f *os.File) (*zstdFile, error) {
	if _, err := f.Seek(zhdrLen, io.SeekStart); err != nil {
		return nil, fmt.Errorf("cas: seek compressed object: %w", err)
	}
	dec := zdecPool.Get().(*zstd.Decoder)
	if err := dec.Reset(f); err != nil {
		zdecPool.Put(dec)
		return nil, fmt.Errorf("cas: zstd reset: %w", err)
	}
	return &zstdFile{f: f, dec: dec}, nil
}

func (z *zstdFile) Read(p []byte) (int, error) {
	if z.dec == nil {
		return 0, os.ErrClosed
	}
	n, err := z.dec.Read(p)
	if err != nil && err != io.EOF {
		err = fmt.Errorf("cas: decompress %s: %w", z.f.Name(), err)
	}
	return n, err
}

func (z *zstdFile) Close() error {
	if z.dec != nil {
		z.dec.Reset(nil)
		zdecPool.Put(z.dec)
		z.dec = nil
	}
	return z.f.Close()
}

// fdWriter writes to a raw descriptor (no os.File/poller overhead),
// retrying short writes.
type fdWriter int

func (w fdWriter) Write(p []byte) (int, error) {
	n := 0
	for n < len(p) {
		m, err := unix.Write(int(w), p[n:])
		if err != nil {
			if err == unix.EINTR {
				continue
			}
			return n, err
		}
		n += m
	}
	return n, nil
}

// compressAll appends header+frame for small content to dst[:0].
func compressAll(src, dst []byte) []byte {
	var hdr [zhdrLen]byte
	putZHeader(hdr[:], int64(len(src)))
	return zencAll().EncodeAll(src, append(dst[:0], hdr[:]...))
}
