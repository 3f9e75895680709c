// Copyright 2009 The Go Authors. All rights reserved.
// Use of this source code is governed by a BSD-style
// license that can be found in the LICENSE file.

// Package goflate is the deflate path (levels 4-9) of Go 1.26's
// compress/flate, copied so that its state at a block boundary can be
// recorded (Capture) and re-created (Resume): a gzip layer written by
// compress/gzip at those levels can then be re-compressed in independent
// chunks, in parallel, and the chunks concatenated bit-exactly.
//
// Changes against the standard library, none of which changes the output:
//   - deflate runs only on a full window (or at the end), so the point where
//     the window slides does not depend on how the input was split into
//     writes (the standard library's output can, in rare cases);
//   - the block writer counts output bits and can start at a bit offset;
//   - matchLen compares 8 bytes at a time;
//   - levels 0-3, dictionaries, Flush and Reset are gone.
//
// The golden tests in proxy/recipe check that it produces compress/flate's
// bytes, and every recipe that uses it was verified at ingest.
package goflate

import (
	"encoding/binary"
	"math"
	"math/bits"
)

const (
	logWindowSize = 15
	windowSize    = 1 << logWindowSize
	windowMask    = windowSize - 1

	baseMatchLength = 3       // The smallest match length per the RFC section 3.2.5
	minMatchLength  = 4       // The smallest match length that the compressor actually emits
	maxMatchLength  = 258     // The largest match length
	baseMatchOffset = 1       // The smallest match offset
	maxMatchOffset  = 1 << 15 // The largest match offset

	maxFlateBlockTokens = 1 << 14
	maxStoreBlockSize   = 65535
	hashBits            = 17 // After 17 performance degrades
	hashSize            = 1 << hashBits
	hashMask            = (1 << hashBits) - 1
	maxHashOffset       = 1 << 24

	skipNever = math.MaxInt32

	maxNumLit = 286 // from inflate.go
)

// InternalError reports an error in the flate code itself.
type InternalError string

func (e InternalError) Error() string { return "goflate: internal error: " + string(e) }

type compressionLevel struct {
	level, good, lazy, nice, chain, fastSkipHashing int
}

// levels 4-9 of compress/flate (all lazy matching with full hash insertion,
// which is what makes the hash chains re-creatable from the window alone).
var levels = map[int]compressionLevel{
	4: {4, 4, 4, 16, 16, skipNever},
	5: {5, 8, 16, 32, 32, skipNever},
	6: {6, 8, 16, 128, 128, skipNever},
	7: {7, 8, 32, 128, 256, skipNever},
	8: {8, 32, 128, 258, 1024, skipNever},
	9: {9, 32, 258, 258, 4096, skipNever},
}

// Supported reports whether level can be captured and resumed.
func Supported(level int) bool { _, ok := levels[level]; return ok }

type compressor struct {
	compressionLevel

	w  *huffmanBitWriter
	cw countWriter

	// input window: unprocessed data is window[index:windowEnd]
	index         int
	window        []byte
	windowEnd     int
	blockStart    int  // window index where current tokens start
	byteAvailable bool // if true, still need to process window[index-1].

	sync bool // requesting flush

	// queued output tokens
	tokens []token

	// deflate state
	length         int
	offset         int
	maxInsertIndex int
	err            error

	// Checkpointing (not in compress/flate).
	base      int64 // input offset of window[0]
	bitOrigin int64 // output bits before this compressor's first bit
	blockDone bool  // a block was written: the loop top is a checkpoint
	onBlock   func(*compressor) bool
	stopped   bool

	chainHead  int
	hashHead   [hashSize]uint32
	hashPrev   [windowSize]uint32
	hashOffset int
}

// countWriter counts the bytes the block writer hands out.
type countWriter struct {
	w interface{ Write([]byte) (int, error) }
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// bitPos is the number of output bits produced so far.
func (d *compressor) bitPos() int64 {
	return d.bitOrigin + (d.cw.n+int64(d.w.nbytes))*8 + int64(d.w.nbits)
}

func (d *compressor) fillDeflate(b []byte) int {
	if d.index >= 2*windowSize-(minMatchLength+maxMatchLength) {
		// shift the window by windowSize
		copy(d.window, d.window[windowSize:2*windowSize])
		d.index -= windowSize
		d.windowEnd -= windowSize
		d.base += windowSize
		if d.blockStart >= windowSize {
			d.blockStart -= windowSize
		} else {
			d.blockStart = math.MaxInt32
		}
		d.hashOffset += windowSize
		if d.hashOffset > maxHashOffset {
			delta := d.hashOffset - 1
			d.hashOffset -= delta
			d.chainHead -= delta
			for i, v := range d.hashPrev[:] {
				if int(v) > delta {
					d.hashPrev[i] = uint32(int(v) - delta)
				} else {
					d.hashPrev[i] = 0
				}
			}
			for i, v := range d.hashHead[:] {
				if int(v) > delta {
					d.hashHead[i] = uint32(int(v) - delta)
				} else {
					d.hashHead[i] = 0
				}
			}
		}
	}
	n := copy(d.window[d.windowEnd:], b)
	d.windowEnd += n
	return n
}

func (d *compressor) writeBlock(tokens []token, index int) error {
	if index > 0 {
		var window []byte
		if d.blockStart <= index {
			window = d.window[d.blockStart:index]
		}
		d.blockStart = index
		d.w.writeBlock(tokens, false, window)
		d.blockDone = true
		return d.w.err
	}
	return nil
}

// Try to find a match starting at index whose length is greater than prevSize.
// We only look at chainCount possibilities before giving up.
func (d *compressor) findMatch(pos int, prevHead int, prevLength int, lookahead int) (length, offset int, ok bool) {
	minMatchLook := maxMatchLength
	if lookahead < minMatchLook {
		minMatchLook = lookahead
	}

	win := d.window[0 : pos+minMatchLook]

	// We quit when we get a match that's at least nice long
	nice := len(win) - pos
	if d.nice < nice {
		nice = d.nice
	}

	// If we've got a match that's good enough, only look in 1/4 the chain.
	tries := d.chain
	length = prevLength
	if length >= d.good {
		tries >>= 2
	}

	wEnd := win[pos+length]
	wPos := win[pos:]
	minIndex := pos - windowSize

	for i := prevHead; tries > 0; tries-- {
		if wEnd == win[i+length] {
			n := matchLen(win[i:], wPos, minMatchLook)

			if n > length && (n > minMatchLength || pos-i <= 4096) {
				length = n
				offset = pos - i
				ok = true
				if n >= nice {
					// The match is good enough that we don't try to find a better one.
					break
				}
				wEnd = win[pos+n]
			}
		}
		if i == minIndex {
			// hashPrev[i & windowMask] has already been overwritten, so stop now.
			break
		}
		i = int(d.hashPrev[i&windowMask]) - d.hashOffset
		if i < minIndex || i < 0 {
			break
		}
	}
	return
}

const hashmul = 0x1e35a7bd

// hash4 returns a hash representation of the first 4 bytes
// of the supplied slice.
// The caller must ensure that len(b) >= 4.
func hash4(b []byte) uint32 {
	return ((uint32(b[3]) | uint32(b[2])<<8 | uint32(b[1])<<16 | uint32(b[0])<<24) * hashmul) >> (32 - hashBits)
}

// matchLen returns the number of matching bytes in a and b up to length
// 'max' (same result as compress/flate's byte loop, 8 bytes at a time).
// Both slices must be at least 'max' bytes in size.
func matchLen(a, b []byte, max int) int {
	a = a[:max]
	b = b[:len(a)]
	n := 0
	for len(a)-n >= 8 {
		if x := binary.LittleEndian.Uint64(a[n:]) ^ binary.LittleEndian.Uint64(b[n:]); x != 0 {
			return n + bits.TrailingZeros64(x)>>3
		}
		n += 8
	}
	for ; n < len(a); n++ {
		if a[n] != b[n] {
			return n
		}
	}
	return max
}

func (d *compressor) initDeflate(level int) {
	d.compressionLevel = levels[level]
	d.window = make([]byte, 2*windowSize)
	d.hashOffset = 1
	d.tokens = make([]token, 0, maxFlateBlockTokens+1)
	d.length = minMatchLength - 1
	d.offset = 0
	d.byteAvailable = false
	d.index = 0
	d.chainHead = -1
}
