package recipe

// gzipCandidates lists plausible encoders for a gzip member, most likely
// first. Go writers (OS byte 255) set XFL from the level: 2 only for level 9,
// 4 only for level 1, 0 otherwise, which prunes most levels for free.
func gzipCandidates(h gzipHeader, header []byte, size int64) []*Recipe {
	levels := []int{6, 5, 1, 9, 2, 3, 4, 7, 8, 0} // defaults (go 6, klauspost 5) first
	if h.os == 255 {
		switch h.xfl {
		case 2:
			levels = []int{9}
		case 4:
			levels = []int{1}
		default:
			levels = []int{6, 5, 2, 3, 4, 7, 8, 0}
		}
	}
	var out []*Recipe
	for _, l := range levels {
		for _, enc := range []string{encGoFlate, encKPFlate} {
			out = append(out, &Recipe{Format: FormatGzip, enc: enc, level: l, header: header, size: size})
		}
	}
	return out
}

// zstdCandidates reads the frame header (RFC 8878 3.1.1.1) and lists the
// klauspost levels with the window and checksum it implies. The streaming
// writer turns a stream that fits one block into an EncodeAll frame (content
// size, single segment, no window descriptor): the same writer reproduces
// that, so only dictionaries and reserved bits are refused.
func zstdCandidates(head []byte, size int64) []*Recipe {
	fhd := head[4]
	if fhd&0x03 != 0 || fhd&0x08 != 0 {
		return nil // dictionary id or reserved bit
	}
	crc := fhd&0x04 != 0
	window := 0 // single segment: no descriptor, the level's default applies
	var contentSize int64
	if fhd&0x20 == 0 {
		// A streamed frame with a content size: Encoder.ResetContentSize.
		// (A single-segment one is the one-shot frame of a stream that fit
		// one block, reproduced as such; EncodeAll of more than a block
		// also writes one, which streaming does not reproduce.)
		var ok bool
		if contentSize, ok = zstdContentSize(head, fhd); !ok {
			return nil
		}
		wd := head[5]
		exp := int(wd>>3) + 10
		if wd&7 != 0 || exp > 29 {
			return nil // klauspost only writes power-of-two windows
		}
		window = 1 << exp
	}
	var out []*Recipe
	add := func(l int, o zstdOptions) {
		out = append(out, &Recipe{Format: FormatZstd, enc: encKPZstd, level: l, zopt: o, size: size})
	}
	// containerd/moby/BuildKit/containers-image use the default level: first.
	for _, l := range []int{2, 1, 3, 4} {
		w := window
		if w == defaultZstdWindow(l) {
			w = 0
		}
		add(l, zstdOptions{CRC: crc, Window: w, ContentSize: contentSize})
	}
	// SpeedFastest with a window set before the level keeps 128 KiB blocks;
	// a single-segment frame does not tell the window, whose value then
	// only decides the block size (a one-shot frame fits any window >= it).
	if window == 0 || window > 64<<10 {
		w := window
		if w == 0 {
			w = defaultZstdWindow(1)
		}
		add(1, zstdOptions{CRC: crc, Window: w, WindowFirst: true, ContentSize: contentSize})
	}
	return out
}

// defaultZstdWindow is klauspost's window per level when none is set.
func defaultZstdWindow(level int) int {
	if level == 1 {
		return 4 << 20
	}
	return 8 << 20
}

// zstdContentSize reads the Frame_Content_Size of a frame with a window
// descriptor (no dictionary id): 0 when absent.
func zstdContentSize(head []byte, fhd byte) (int64, bool) {
	n := [4]int{0, 2, 4, 8}[fhd>>6]
	if len(head) < 6+n {
		return 0, false
	}
	var v uint64
	for i := n - 1; i >= 0; i-- {
		v = v<<8 | uint64(head[6+i])
	}
	if n == 2 {
		v += 256
	}
	if v > 1<<62 {
		return 0, false
	}
	return int64(v), true
}
