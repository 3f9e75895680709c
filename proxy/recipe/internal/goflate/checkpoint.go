package goflate

import (
	"errors"
	"fmt"
	"io"
	"sync"
)

// Checkpoint is the compressor's state right after a block was written:
// everything that, with the input, determines all later output. The hash
// chains are not stored: at levels 4-9 every position of the last 32 KiB was
// inserted, so re-hashing the window re-creates the chains that matter.
type Checkpoint struct {
	Pos       int64 // input offset where the next block starts
	Base      int64 // input offset of window[0] (a multiple of 32 KiB)
	Index     int32 // window index of the next position to process
	Length    int32 // lazy match pending at Index-1 (with ByteAvail)
	Offset    int32
	ByteAvail bool
	Bit       int64 // output bits before the next block
}

func (c Checkpoint) String() string {
	return fmt.Sprintf("{pos %d base %d index %d len %d off %d avail %t bit %d}", c.Pos, c.Base, c.Index, c.Length, c.Offset, c.ByteAvail, c.Bit)
}

func (d *compressor) checkpoint() Checkpoint {
	return Checkpoint{
		Pos: d.base + int64(d.blockStart), Base: d.base, Index: int32(d.index),
		Length: int32(d.length), Offset: int32(d.offset), ByteAvail: d.byteAvailable,
		Bit: d.bitPos(),
	}
}

// Capture compresses like compress/flate's Writer at a level of 4-9 and
// records a checkpoint at the first block boundary after every `every`
// input bytes.
type Capture struct {
	d    compressor
	cps  []Checkpoint
	next int64
}

// NewCapture returns a Capture writing raw deflate to w.
func NewCapture(w io.Writer, level int, every int64) (*Capture, error) {
	if !Supported(level) {
		return nil, fmt.Errorf("goflate: level %d cannot be checkpointed", level)
	}
	if every <= 0 {
		return nil, errors.New("goflate: checkpoint interval must be positive")
	}
	c := &Capture{next: every}
	c.d.cw.w = w
	c.d.w = newHuffmanBitWriter(&c.d.cw)
	c.d.initDeflate(level)
	c.d.onBlock = func(d *compressor) bool {
		if p := d.base + int64(d.blockStart); p >= c.next {
			c.cps = append(c.cps, d.checkpoint())
			c.next = p + every
		}
		return false
	}
	return c, nil
}

func (c *Capture) Write(p []byte) (int, error) { return c.d.write(p) }

// Close writes the end of the stream (it does not close w).
func (c *Capture) Close() error { return c.d.close() }

// Checkpoints are those recorded so far, in input order.
func (c *Capture) Checkpoints() []Checkpoint { return c.cps }

// Resume re-compresses from checkpoint from: data is the input from
// from.Base on. With to set, it stops at that checkpoint (data must reach
// 64 KiB past to.Pos, or the end of the input) and fails unless the state
// there equals to; without, it runs to the end of data and closes the
// stream. Output goes to w starting at bit from.Bit%8 of its first byte
// (the bits below are zero, for the caller to OR with the previous chunk's
// last byte); the last byte is zero-padded. It returns the bit position
// reached (== to.Bit when to is set).
func Resume(w io.Writer, level int, from Checkpoint, to *Checkpoint, data []byte) (bit int64, err error) {
	// A checkpoint that passed valid can still be inconsistent with the data
	// (corruption): whatever the copied encoder trips over is an error here.
	defer func() {
		if r := recover(); r != nil {
			bit, err = 0, fmt.Errorf("goflate: resumed from %v: %v", from, r)
		}
	}()
	if !Supported(level) {
		return 0, fmt.Errorf("goflate: level %d cannot be resumed", level)
	}
	if err := from.valid(int64(len(data))); err != nil {
		return 0, fmt.Errorf("goflate: bad checkpoint %v: %w", from, err)
	}
	if to != nil && (to.Pos <= from.Pos || to.Bit < from.Bit || to.Base < from.Base) {
		return 0, fmt.Errorf("goflate: checkpoint %v does not follow %v", *to, from)
	}
	d := compressors.Get().(*compressor)
	defer func() { d.onBlock = nil; compressors.Put(d) }()
	d.reset(w, level)
	d.bitOrigin = from.Bit &^ 7
	d.w.nbits = uint(from.Bit & 7)
	d.base = from.Base
	consumed := d.fillDeflate(data)
	d.index = int(from.Index)
	d.blockStart = int(from.Pos - from.Base)
	d.length, d.offset, d.byteAvailable = int(from.Length), int(from.Offset), from.ByteAvail
	for i := max(0, d.index-windowSize); i < d.index; i++ {
		hh := &d.hashHead[hash4(d.window[i:i+minMatchLength])&hashMask]
		d.hashPrev[i&windowMask] = *hh
		*hh = uint32(i + d.hashOffset)
	}
	var mismatch error
	if to != nil {
		d.onBlock = func(d *compressor) bool {
			p := d.base + int64(d.blockStart)
			switch {
			case p < to.Pos:
				return false
			case p > to.Pos:
				mismatch = fmt.Errorf("goflate: resumed from %v, passed checkpoint %v at %d without a block boundary", from, *to, p)
			default:
				if got := d.checkpoint(); got != *to {
					mismatch = fmt.Errorf("goflate: resumed from %v, state at %d is %v, want %v", from, p, got, *to)
				}
			}
			return true
		}
	}
	for {
		d.deflate()
		if d.err != nil {
			return 0, d.err
		}
		if d.stopped {
			if mismatch != nil {
				return 0, mismatch
			}
			d.w.flush()
			return to.Bit, d.w.err
		}
		if consumed == len(data) {
			break
		}
		consumed += d.fillDeflate(data[consumed:])
	}
	if to != nil {
		return 0, fmt.Errorf("goflate: resumed from %v, input ended before checkpoint %v", from, *to)
	}
	if err := d.close(); err != nil {
		return 0, err
	}
	return d.bitOrigin + d.cw.n*8, nil
}

// compressors are reused across chunks: each holds ~800 KiB of tables.
var compressors = sync.Pool{New: func() any { return new(compressor) }}

// reset makes d a fresh compressor writing to w (tables cleared).
func (d *compressor) reset(w io.Writer, level int) {
	window, tokens, bw := d.window, d.tokens, d.w
	*d = compressor{}
	d.cw.w = w
	if bw == nil {
		bw = newHuffmanBitWriter(&d.cw)
	}
	bw.reset(&d.cw)
	d.w = bw
	d.compressionLevel = levels[level]
	if window == nil {
		window = make([]byte, 2*windowSize)
	}
	d.window = window
	d.tokens = tokens[:0]
	if d.tokens == nil {
		d.tokens = make([]token, 0, maxFlateBlockTokens+1)
	}
	d.hashOffset = 1
	d.length = minMatchLength - 1
	d.chainHead = -1
}

// valid rejects checkpoints Resume could not start from (corruption).
func (c Checkpoint) valid(dataLen int64) error {
	idx := int64(c.Index)
	switch {
	case c.Base < 0 || c.Base%windowSize != 0:
		return errors.New("window base")
	case c.Bit < 0:
		return errors.New("bit position")
	case idx < 0 || idx >= 2*windowSize || (idx > 0 && (idx+minMatchLength > dataLen || idx+minMatchLength > 2*windowSize)):
		return errors.New("window index")
	case c.Pos < c.Base || c.Pos > c.Base+idx:
		return errors.New("block start")
	case c.Length < minMatchLength-1 || c.Length > maxMatchLength || c.Offset < 0 || c.Offset > maxMatchOffset:
		return errors.New("pending match")
	case !c.ByteAvail && c.Length != minMatchLength-1:
		return errors.New("pending match without a pending byte")
	case c.Length >= minMatchLength && (c.Offset < 1 || int64(c.Offset) > idx-1):
		return errors.New("pending match offset")
	}
	return nil
}
