package layout

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
)

// Encoding: "DSLM" | version | zstd(body) | sha256 of everything before it.
// The body is varint-packed; each entry's metadata sits right before its raw
// tar header so zstd finds the path repeated in the header.
const (
	manifestMagic   = "DSLM"
	manifestVersion = 1
)

// ErrCorruptManifest wraps every Unmarshal failure.
var ErrCorruptManifest = errors.New("layout: corrupt manifest")

const (
	flWhiteout = 1 << iota
	flOpaque
	flXattrs
	flMtime
	flAtime
	flCtime
	flDigest
	flPayDigest
)

var (
	zenc = sync.OnceValue(func() *zstd.Encoder {
		e, _ := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedBetterCompression), zstd.WithEncoderConcurrency(1))
		return e
	})
	zdec = sync.OnceValue(func() *zstd.Decoder {
		d, _ := zstd.NewReader(nil, zstd.WithDecoderMaxMemory(maxManifestBody), zstd.WithDecoderConcurrency(1),
			zstd.WithDecoderMaxWindow(zstdMaxWindow))
		return d
	})
)

type encBuf struct{ b []byte }

func (e *encBuf) uv(v uint64)    { e.b = binary.AppendUvarint(e.b, v) }
func (e *encBuf) sv(v int64)     { e.b = binary.AppendVarint(e.b, v) }
func (e *encBuf) bytes(p []byte) { e.uv(uint64(len(p))); e.b = append(e.b, p...) }
func (e *encBuf) str(s string)   { e.uv(uint64(len(s))); e.b = append(e.b, s...) }
func (e *encBuf) time(t time.Time) {
	e.sv(t.Unix())
	e.uv(uint64(t.Nanosecond()))
}
func (e *encBuf) dig(d digest.Digest) error {
	if d.Algorithm() != digest.SHA256 || d.Validate() != nil {
		return fmt.Errorf("layout: cannot encode digest %q", d)
	}
	raw, _ := hex.DecodeString(d.Encoded())
	e.b = append(e.b, raw...)
	return nil
}

// Marshal returns the compact, checksummed encoding of m.
func (m *Manifest) Marshal() ([]byte, error) {
	if len(m.raw.segs) != len(m.Entries) {
		return nil, fmt.Errorf("layout: manifest has %d segments for %d entries", len(m.raw.segs), len(m.Entries))
	}
	e := &encBuf{b: make([]byte, 0, 64+len(m.Entries)*600)}
	if err := e.dig(m.DiffID); err != nil {
		return nil, err
	}
	e.uv(uint64(m.Size))
	e.uv(uint64(len(m.Entries)))
	for i := range m.Entries {
		en := &m.Entries[i]
		seg := &m.raw.segs[i]
		var fl uint64
		if en.Whiteout {
			fl |= flWhiteout
		}
		if en.Opaque {
			fl |= flOpaque
		}
		if len(en.Xattrs) > 0 {
			fl |= flXattrs
		}
		if !en.ModTime.IsZero() {
			fl |= flMtime
		}
		if !en.AccessTime.IsZero() {
			fl |= flAtime
		}
		if !en.ChangeTime.IsZero() {
			fl |= flCtime
		}
		if en.Digest != "" {
			fl |= flDigest
		}
		if seg.payDigest != "" {
			fl |= flPayDigest
		}
		e.b = append(e.b, byte(en.Type))
		e.uv(fl)
		e.str(en.Path)
		e.uv(uint64(en.Mode))
		e.uv(uint64(en.UID))
		e.uv(uint64(en.GID))
		if fl&flMtime != 0 {
			e.time(en.ModTime)
		}
		if fl&flAtime != 0 {
			e.time(en.AccessTime)
		}
		if fl&flCtime != 0 {
			e.time(en.ChangeTime)
		}
		if fl&flXattrs != 0 {
			keys := sortedKeys(en.Xattrs)
			e.uv(uint64(len(keys)))
			for _, k := range keys {
				e.str(k)
				e.str(en.Xattrs[k])
			}
		}
		e.str(en.Linkname)
		e.uv(uint64(en.Devmajor))
		e.uv(uint64(en.Devminor))
		e.uv(uint64(en.Size))
		if fl&flDigest != 0 {
			if err := e.dig(en.Digest); err != nil {
				return nil, err
			}
		}
		e.bytes(seg.hdr)
		e.uv(uint64(seg.paySize))
		if fl&flPayDigest != 0 {
			if err := e.dig(seg.payDigest); err != nil {
				return nil, err
			}
		}
	}
	e.bytes(m.raw.tail)

	out := make([]byte, 0, len(e.b)/4+64)
	out = append(out, manifestMagic...)
	out = append(out, manifestVersion)
	out = zenc().EncodeAll(e.b, out)
	sum := sha256.Sum256(out)
	return append(out, sum[:]...), nil
}

type decBuf struct {
	b   []byte
	err error
}

func (d *decBuf) fail(what string) {
	if d.err == nil {
		d.err = fmt.Errorf("%w: bad %s", ErrCorruptManifest, what)
	}
}
func (d *decBuf) uv(what string, max uint64) uint64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Uvarint(d.b)
	if n <= 0 || v > max {
		d.fail(what)
		return 0
	}
	d.b = d.b[n:]
	return v
}
func (d *decBuf) sv(what string) int64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Varint(d.b)
	if n <= 0 {
		d.fail(what)
		return 0
	}
	d.b = d.b[n:]
	return v
}
func (d *decBuf) raw(what string) []byte {
	n := d.uv(what, uint64(len(d.b)))
	if d.err == nil && n > uint64(len(d.b)) { // the varint itself was consumed
		d.fail(what)
	}
	if d.err != nil {
		return nil
	}
	p := d.b[:n:n]
	d.b = d.b[n:]
	return p
}
func (d *decBuf) str(what string) string { return string(d.raw(what)) }
func (d *decBuf) time(what string) time.Time {
	s := d.sv(what)
	ns := d.uv(what, 999999999)
	return time.Unix(s, int64(ns))
}
func (d *decBuf) dig(what string) digest.Digest {
	if d.err != nil {
		return ""
	}
	if len(d.b) < sha256.Size {
		d.fail(what)
		return ""
	}
	v := digest.NewDigestFromBytes(digest.SHA256, d.b[:sha256.Size])
	d.b = d.b[sha256.Size:]
	return v
}

// Unmarshal decodes a manifest, refusing corrupt or hostile input (the error
// wraps ErrCorruptManifest).
func Unmarshal(b []byte) (*Manifest, error) {
	if len(b) < len(manifestMagic)+1+sha256.Size || string(b[:4]) != manifestMagic {
		return nil, fmt.Errorf("%w: not a manifest", ErrCorruptManifest)
	}
	if b[4] != manifestVersion {
		return nil, fmt.Errorf("%w: unknown version %d", ErrCorruptManifest, b[4])
	}
	body, sum := b[:len(b)-sha256.Size], b[len(b)-sha256.Size:]
	if want := sha256.Sum256(body); !bytes.Equal(want[:], sum) {
		return nil, fmt.Errorf("%w: checksum mismatch", ErrCorruptManifest)
	}
	plain, err := zdec().DecodeAll(body[5:], nil)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrCorruptManifest, err)
	}
	return decodeBody(plain)
}

// decodeBody parses the uncompressed body; it trusts nothing in it.
func decodeBody(plain []byte) (*Manifest, error) {
	d := &decBuf{b: plain}
	m := &Manifest{}
	m.DiffID = d.dig("diff id")
	m.Size = int64(d.uv("size", 1<<62))
	n := d.uv("entry count", uint64(len(d.b)/8))
	if d.err != nil {
		return nil, d.err
	}
	m.Entries = make([]Entry, n)
	m.raw.segs = make([]rawSeg, n)
	var total int64
	for i := range m.Entries {
		en := &m.Entries[i]
		seg := &m.raw.segs[i]
		if len(d.b) == 0 {
			d.fail("entry")
			break
		}
		en.Type = EntryType(d.b[0])
		d.b = d.b[1:]
		fl := d.uv("flags", 0xff)
		en.Path = d.str("path")
		en.Mode = uint32(d.uv("mode", 07777))
		en.UID = int(d.uv("uid", 1<<31-1))
		en.GID = int(d.uv("gid", 1<<31-1))
		if fl&flMtime != 0 {
			en.ModTime = d.time("mtime")
		}
		if fl&flAtime != 0 {
			en.AccessTime = d.time("atime")
		}
		if fl&flCtime != 0 {
			en.ChangeTime = d.time("ctime")
		}
		if fl&flXattrs != 0 {
			nx := d.uv("xattr count", uint64(len(d.b)/2))
			en.Xattrs = make(map[string]string, nx)
			for j := uint64(0); j < nx && d.err == nil; j++ {
				k := d.str("xattr")
				en.Xattrs[k] = d.str("xattr")
			}
		}
		en.Linkname = d.str("linkname")
		en.Devmajor = uint32(d.uv("devmajor", 1<<32-1))
		en.Devminor = uint32(d.uv("devminor", 1<<32-1))
		en.Size = int64(d.uv("size", 1<<62))
		if fl&flDigest != 0 {
			en.Digest = d.dig("digest")
		}
		en.Whiteout = fl&flWhiteout != 0
		en.Opaque = fl&flOpaque != 0
		seg.hdr = d.raw("header")
		seg.paySize = int64(d.uv("payload size", 1<<62))
		if fl&flPayDigest != 0 {
			seg.payDigest = d.dig("payload digest")
		}
		if d.err != nil {
			break
		}
		if err := validEntry(en, seg); err != nil {
			return nil, err
		}
		total += int64(len(seg.hdr)) + seg.paySize
		if total < 0 || total > m.Size {
			return nil, fmt.Errorf("%w: entries exceed the layer size", ErrCorruptManifest)
		}
	}
	m.raw.tail = d.raw("tail")
	if d.err != nil {
		return nil, d.err
	}
	if len(d.b) != 0 {
		return nil, fmt.Errorf("%w: %d trailing bytes", ErrCorruptManifest, len(d.b))
	}
	if total+int64(len(m.raw.tail)) != m.Size {
		return nil, fmt.Errorf("%w: parts add up to %d, layer size %d", ErrCorruptManifest, total+int64(len(m.raw.tail)), m.Size)
	}
	return m, nil
}

func validEntry(en *Entry, seg *rawSeg) error {
	bad := func(why string) error {
		return fmt.Errorf("%w: entry %q: %s", ErrCorruptManifest, en.Path, why)
	}
	switch en.Type {
	case TypeFile, TypeHardlink, TypeSymlink, TypeChar, TypeBlock, TypeDir, TypeFifo:
	default:
		return bad("type")
	}
	if p, err := cleanPath(en.Path); err != nil || p != en.Path {
		return bad("path")
	}
	if en.Type == TypeHardlink {
		if p, err := cleanPath(en.Linkname); err != nil || p != en.Linkname {
			return bad("hardlink target")
		}
	}
	if en.Type == TypeFile {
		if en.Digest == "" {
			return bad("no digest")
		}
	} else if en.Size != 0 || en.Digest != "" {
		return bad("content on a non-file")
	}
	if seg.payDigest == "" && seg.paySize != en.Size {
		return bad("payload size")
	}
	if seg.payDigest != "" && seg.paySize == 0 {
		return bad("empty payload object")
	}
	return nil
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	for i := 1; i < len(keys); i++ {
		for j := i; j > 0 && keys[j] < keys[j-1]; j-- {
			keys[j], keys[j-1] = keys[j-1], keys[j]
		}
	}
	return keys
}
