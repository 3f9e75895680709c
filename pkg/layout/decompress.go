package layout

import (
	"bufio"
	"bytes"
	"fmt"
	"io"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
)

// Compression is the encoding a layer stream was detected to have.
type Compression int

const (
	Uncompressed Compression = iota
	Gzip
	Zstd
)

func (c Compression) String() string {
	switch c {
	case Gzip:
		return "gzip"
	case Zstd:
		return "zstd"
	}
	return "uncompressed"
}

var (
	gzipMagic = []byte{0x1f, 0x8b}
	zstdMagic = []byte{0x28, 0xb5, 0x2f, 0xfd}
)

// DetectCompression peeks at the first bytes of r.
func DetectCompression(br *bufio.Reader) Compression {
	b, _ := br.Peek(4)
	switch {
	case bytes.HasPrefix(b, gzipMagic):
		return Gzip
	case bytes.HasPrefix(b, zstdMagic):
		return Zstd
	}
	return Uncompressed
}

// decompress returns the uncompressed stream of r (encoding detected by
// magic) and a function releasing the decoder's resources.
func decompress(r io.Reader) (io.Reader, Compression, func(), error) {
	br := bufio.NewReaderSize(r, 256<<10)
	c := DetectCompression(br)
	switch c {
	case Gzip:
		zr, err := gzip.NewReader(br)
		if err != nil {
			return nil, c, nil, fmt.Errorf("%w: gzip: %v", ErrInvalidLayer, err)
		}
		return zr, c, func() { _ = zr.Close() }, nil
	case Zstd:
		// Bounded window and memory: a hostile frame cannot make us allocate
		// more than zstdMaxWindow (plus block buffers).
		zr, err := zstd.NewReader(br,
			zstd.WithDecoderMaxWindow(zstdMaxWindow),
			zstd.WithDecoderMaxMemory(zstdMaxWindow),
			zstd.WithDecoderConcurrency(1),
		)
		if err != nil {
			return nil, c, nil, fmt.Errorf("%w: zstd: %v", ErrInvalidLayer, err)
		}
		return zr, c, zr.Close, nil
	}
	return br, c, func() {}, nil
}
