package recipe

import (
	stdflate "compress/flate"
	"encoding/binary"
	"fmt"
	"hash"
	"hash/crc32"
	"io"

	kpflate "github.com/klauspost/compress/flate"
	"github.com/klauspost/compress/zstd"
)

// newEncoder returns a WriteCloser that compresses into w exactly as the
// recipe's encoder did; Close writes the trailer but does not close w.
func (r *Recipe) newEncoder(w io.Writer) (io.WriteCloser, error) {
	switch r.Format {
	case FormatGzip:
		return newGzipEncoder(w, r.enc, r.level, r.header)
	case FormatZstd:
		return newZstdEncoder(w, r.level, r.zopt)
	}
	return nil, fmt.Errorf("recipe: unknown format %q", r.Format)
}

// gzipEncoder is compress/gzip's Writer with the header replaced by verbatim
// bytes: both Go and klauspost gzip write header, raw deflate, CRC32, ISIZE,
// so only the deflate implementation has to be chosen.
type gzipEncoder struct {
	w      io.Writer
	header []byte
	fw     io.WriteCloser
	crc    hash.Hash32
	size   uint32
	wrote  bool
}

func newGzipEncoder(w io.Writer, enc string, level int, header []byte) (*gzipEncoder, error) {
	var fw io.WriteCloser
	var err error
	switch enc {
	case encGoFlate:
		fw, err = stdflate.NewWriter(w, level)
	case encKPFlate:
		fw, err = kpflate.NewWriter(w, level)
	default:
		err = fmt.Errorf("unknown gzip encoder %q", enc)
	}
	if err != nil {
		return nil, fmt.Errorf("recipe: gzip encoder: %w", err)
	}
	return &gzipEncoder{w: w, header: header, fw: fw, crc: crc32.NewIEEE()}, nil
}

func (g *gzipEncoder) writeHeader() error {
	if g.wrote {
		return nil
	}
	g.wrote = true
	_, err := g.w.Write(g.header)
	return err
}

func (g *gzipEncoder) Write(p []byte) (int, error) {
	if err := g.writeHeader(); err != nil {
		return 0, err
	}
	g.crc.Write(p)
	g.size += uint32(len(p)) // ISIZE is the size modulo 2^32
	return g.fw.Write(p)
}

func (g *gzipEncoder) Close() error {
	if err := g.writeHeader(); err != nil {
		return err
	}
	if err := g.fw.Close(); err != nil {
		return err
	}
	var t [8]byte
	binary.LittleEndian.PutUint32(t[:4], g.crc.Sum32())
	binary.LittleEndian.PutUint32(t[4:], g.size)
	_, err := g.w.Write(t[:])
	return err
}

// newZstdEncoder mirrors zstd.NewWriter as containerd, ggcr and moby call it
// (streaming, one frame, no content size). Concurrency 1 avoids goroutines;
// the streaming output does not depend on it (tested).
func newZstdEncoder(w io.Writer, level int, o zstdOptions) (io.WriteCloser, error) {
	var opts []zstd.EOption
	if o.WindowFirst {
		opts = append(opts, zstd.WithWindowSize(o.Window))
	}
	opts = append(opts,
		zstd.WithEncoderLevel(zstd.EncoderLevel(level)),
		zstd.WithEncoderCRC(o.CRC),
		zstd.WithEncoderConcurrency(1),
	)
	if o.Window != 0 && !o.WindowFirst {
		opts = append(opts, zstd.WithWindowSize(o.Window))
	}
	zw, err := zstd.NewWriter(w, opts...)
	if err != nil {
		return nil, fmt.Errorf("recipe: zstd encoder: %w", err)
	}
	if o.ContentSize > 0 {
		zw.ResetContentSize(w, o.ContentSize)
	}
	return zw, nil
}
