// Package recipe decides whether a compressed OCI layer blob (gzip or zstd)
// can be re-created byte for byte from its uncompressed tar, and re-creates it.
//
// A recipe names an exact encoder implementation, level and options, plus the
// verbatim gzip header. Encoder output depends on the library version, so the
// versions below are pinned (go.mod) and guarded by golden-digest tests:
//
//   - gzip "go":         Go standard library compress/flate (go1.26.x)
//   - gzip "klauspost":  github.com/klauspost/compress/flate v1.20.0
//   - zstd "klauspost":  github.com/klauspost/compress/zstd v1.20.0 (streaming Writer),
//     as containerd/moby, BuildKit, containers/image and go-containerregistry
//     call it (zstd_builders_test.go): level, CRC, window, the order of the
//     window and level options, and a content size set by ResetContentSize
//
// Bumping either one must be accompanied by re-checking recipes already stored:
// a recipe that no longer reproduces its digest falls back to the retained blob
// only if the caller verifies the digest, which it must (ApplyVerified).
//
// Restore speed is that of one encoder (~40-50 MB/s of tar for compress/gzip
// level 6 on one core of this class of machine), except for compress/flate
// levels 4-9, the default of Go's gzip and so of most image tools built in
// Go: there ingest records the encoder's state at deflate block boundaries
// (internal/goflate, a copy of compress/flate that can stop and resume
// there), and restore re-compresses the stretches between them on all
// cores and joins them bit-exactly (chunked.go). Other encoders (levels 1-3,
// klauspost) expose no such state and stay sequential.
package recipe

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"

	"github.com/dupsnap/dupsnap/proxy/recipe/internal/goflate"
)

// Formats.
const (
	FormatGzip = "gzip"
	FormatZstd = "zstd"
)

// Encoder implementations. Stored in marshalled recipes: never renumber/rename.
const (
	encGoFlate = "go"        // compress/flate (compress/gzip uses it)
	encKPFlate = "klauspost" // klauspost/compress/flate (klauspost gzip)
	encKPZstd  = "klauspost" // klauspost/compress/zstd streaming encoder
)

// Recipe re-creates a compressed layer blob exactly from its uncompressed tar.
type Recipe struct {
	Format string // "gzip" | "zstd"

	enc    string // encoder implementation, see enc* constants
	level  int    // gzip: flate level 0..9; zstd: zstd.EncoderLevel 1..4
	header []byte // gzip: the member header exactly as found in the blob
	zopt   zstdOptions
	size   int64 // expected blob size, a cheap sanity check for Apply callers

	// gzip/go levels 4-9: encoder checkpoints for parallel restore
	// (chunked.go) and the CRC-32C of the blob bytes each chunk produces.
	cps  []goflate.Checkpoint
	crcs []uint32
}

// zstdOptions are the klauspost encoder options that change the output.
type zstdOptions struct {
	CRC    bool `json:"crc"`
	Window int  `json:"window,omitempty"` // 0: the level's default
	// WindowFirst: WithWindowSize came before WithEncoderLevel. Option order
	// matters at SpeedFastest only: a level set last picks its 64 KiB
	// blocks, a window set first keeps 128 KiB blocks (and the window).
	WindowFirst bool `json:"windowFirst,omitempty"`
	// ContentSize: the streamed frame header carries the tar's size
	// (Encoder.ResetContentSize before writing).
	ContentSize int64 `json:"contentSize,omitempty"`
}

// Encoder describes the recipe for logs and stats, e.g. "gzip/go/6".
func (r *Recipe) Encoder() string {
	s := fmt.Sprintf("%s/%s/%d", r.Format, r.enc, r.level)
	if r.Format == FormatZstd {
		s += fmt.Sprintf("/crc=%t/window=%d", r.zopt.CRC, r.zopt.Window)
		if r.zopt.WindowFirst {
			s += "/window-first"
		}
		if r.zopt.ContentSize != 0 {
			s += fmt.Sprintf("/content-size=%d", r.zopt.ContentSize)
		}
	}
	return s
}

// Chunks is the number of pieces the recipe is re-compressed in, in
// parallel (1: sequentially).
func (r *Recipe) Chunks() int { return len(r.cps) + 1 }

// Size is the size of the blob the recipe produces.
func (r *Recipe) Size() int64 { return r.size }

// wire is the marshalled form; JSON keeps it debuggable and extensible.
type wire struct {
	V      int          `json:"v"`
	Format string       `json:"format"`
	Enc    string       `json:"enc"`
	Level  int          `json:"level"`
	Header []byte       `json:"header,omitempty"`
	Zstd   *zstdOptions `json:"zstd,omitempty"`
	Size   int64        `json:"size"`
	// Chunks (version 2): checkpoints and chunk CRCs, see marshalChunks.
	Chunks []byte `json:"chunks,omitempty"`
}

// magic prefixes marshalled recipes; a CRC32C trailer catches corruption that
// would otherwise still parse (e.g. a flipped level digit).
var magic = []byte("dsrecipe")

// Version 1: encoder and settings; 2: plus checkpoints (older readers
// refuse it by version rather than misreading it).
const (
	wireVersion        = 1
	wireVersionChunked = 2
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Marshal encodes the recipe for storage.
func (r *Recipe) Marshal() ([]byte, error) {
	if err := r.validate(); err != nil {
		return nil, fmt.Errorf("recipe: marshal: %w", err)
	}
	w := wire{V: wireVersion, Format: r.Format, Enc: r.enc, Level: r.level, Size: r.size}
	if r.Format == FormatGzip {
		w.Header = r.header
	} else {
		z := r.zopt
		w.Zstd = &z
	}
	if r.chunked() {
		w.V, w.Chunks = wireVersionChunked, r.marshalChunks()
	}
	body, err := json.Marshal(w)
	if err != nil {
		return nil, fmt.Errorf("recipe: marshal: %w", err)
	}
	out := make([]byte, 0, len(magic)+len(body)+4)
	out = append(out, magic...)
	out = append(out, body...)
	return binary.BigEndian.AppendUint32(out, crc32.Checksum(out, castagnoli)), nil
}

// Unmarshal decodes a recipe produced by Marshal, rejecting corrupted input.
func Unmarshal(b []byte) (*Recipe, error) {
	if len(b) < len(magic)+4 || !bytes.Equal(b[:len(magic)], magic) {
		return nil, errors.New("recipe: unmarshal: bad magic")
	}
	n := len(b) - 4
	if crc32.Checksum(b[:n], castagnoli) != binary.BigEndian.Uint32(b[n:]) {
		return nil, errors.New("recipe: unmarshal: checksum mismatch")
	}
	var w wire
	dec := json.NewDecoder(bytes.NewReader(b[len(magic):n]))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&w); err != nil {
		return nil, fmt.Errorf("recipe: unmarshal: %w", err)
	}
	if w.V != wireVersion && w.V != wireVersionChunked {
		return nil, fmt.Errorf("recipe: unmarshal: unsupported version %d", w.V)
	}
	if (w.V == wireVersionChunked) != (len(w.Chunks) > 0) {
		return nil, fmt.Errorf("recipe: unmarshal: version %d with %d bytes of checkpoints", w.V, len(w.Chunks))
	}
	r := &Recipe{Format: w.Format, enc: w.Enc, level: w.Level, header: w.Header, size: w.Size}
	if w.Zstd != nil {
		r.zopt = *w.Zstd
	}
	if len(w.Chunks) > 0 {
		if !r.checkpointable() {
			return nil, fmt.Errorf("recipe: unmarshal: checkpoints for %s", r.Encoder())
		}
		if err := r.unmarshalChunks(w.Chunks); err != nil {
			return nil, fmt.Errorf("recipe: unmarshal: %w", err)
		}
	}
	if err := r.validate(); err != nil {
		return nil, fmt.Errorf("recipe: unmarshal: %w", err)
	}
	return r, nil
}

// validate rejects recipes Apply could not execute.
func (r *Recipe) validate() error {
	if r.size < 0 {
		return fmt.Errorf("negative size %d", r.size)
	}
	switch r.Format {
	case FormatGzip:
		if r.enc != encGoFlate && r.enc != encKPFlate {
			return fmt.Errorf("unknown gzip encoder %q", r.enc)
		}
		if r.level < 0 || r.level > 9 {
			return fmt.Errorf("bad gzip level %d", r.level)
		}
		h, err := parseGzipHeader(r.header)
		if err != nil {
			return fmt.Errorf("bad gzip header: %w", err)
		}
		if h.len != len(r.header) {
			return fmt.Errorf("gzip header has %d trailing bytes", len(r.header)-h.len)
		}
	case FormatZstd:
		if r.enc != encKPZstd {
			return fmt.Errorf("unknown zstd encoder %q", r.enc)
		}
		if r.level < 1 || r.level > 4 {
			return fmt.Errorf("bad zstd level %d", r.level)
		}
		if w := r.zopt.Window; w != 0 && (w < 1<<10 || w > 1<<29 || w&(w-1) != 0) {
			return fmt.Errorf("bad zstd window %d", w)
		}
		if r.zopt.ContentSize < 0 {
			return fmt.Errorf("bad zstd content size %d", r.zopt.ContentSize)
		}
		if r.zopt.WindowFirst && r.zopt.Window == 0 {
			return fmt.Errorf("zstd window-first without a window")
		}
	default:
		return fmt.Errorf("unknown format %q", r.Format)
	}
	return nil
}
