package recipe

import (
	"bytes"
	"errors"
	"fmt"
	"io"
)

// gzip header flags (RFC 1952).
const (
	gzFText    = 1 << 0
	gzFHCRC    = 1 << 1
	gzFExtra   = 1 << 2
	gzFName    = 1 << 3
	gzFComment = 1 << 4
	gzReserved = 0xe0
)

// maxGzipHeader bounds the header we are willing to keep verbatim in a recipe:
// 10 fixed bytes, a 64 KiB extra field and modest name/comment strings.
const maxGzipHeader = 10 + 2 + 65535 + 2*4096 + 2

// gzipHeader is what we learn from a member header; the recipe keeps the raw
// bytes, so these fields only steer candidate ordering.
type gzipHeader struct {
	len int  // header length in bytes
	xfl byte // 2: writer claimed best compression, 4: fastest
	os  byte // 255 for Go writers, 3 (unix) for gzip/pigz
}

// parseGzipHeader parses the member header at the start of b. b may be longer
// than the header (e.g. the blob prefix).
func parseGzipHeader(b []byte) (gzipHeader, error) {
	var h gzipHeader
	if len(b) < 10 {
		return h, io.ErrUnexpectedEOF
	}
	if b[0] != 0x1f || b[1] != 0x8b {
		return h, errors.New("not gzip: bad magic")
	}
	if b[2] != 8 {
		return h, fmt.Errorf("unsupported gzip method %d", b[2])
	}
	flg := b[3]
	if flg&gzReserved != 0 {
		return h, fmt.Errorf("reserved gzip flags %#x", flg)
	}
	h.xfl, h.os = b[8], b[9]
	p := 10
	if flg&gzFExtra != 0 {
		if len(b) < p+2 {
			return h, io.ErrUnexpectedEOF
		}
		p += 2 + (int(b[p]) | int(b[p+1])<<8)
	}
	for _, f := range []byte{gzFName, gzFComment} {
		if flg&f == 0 {
			continue
		}
		if p > len(b) {
			return h, io.ErrUnexpectedEOF
		}
		i := bytes.IndexByte(b[p:min(len(b), p+4096)], 0)
		if i < 0 {
			if len(b) < p+4096 {
				return h, io.ErrUnexpectedEOF
			}
			return h, errors.New("gzip name/comment too long")
		}
		p += i + 1
	}
	if flg&gzFHCRC != 0 {
		p += 2
	}
	if p > len(b) {
		return h, io.ErrUnexpectedEOF
	}
	h.len = p
	return h, nil
}
