package recipe

import ()

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
	if fhd&0x20 == 0 {
		wd := head[5]
		exp := int(wd>>3) + 10
		if wd&7 != 0 || exp > 29 {
			return nil // klauspost only writes power-of-two windows
		}
		window = 1 << exp
	}
	var out []*Recipe
	for l := 1; l <= 4; l++ {
		w := window
		if w == defaultZstdWindow(l) {
			w = 0
		}
		out = append(out, &Recipe{Format: FormatZstd, enc: encKPZstd, level: l, zopt: zstdOptions{CRC: crc, Window: w}, size: size})
	}
	// containerd/moby use the default level: try it first.
	out[0], out[1] = out[1], out[0]
	return out
}

// defaultZstdWindow is klauspost's window per level when none is set.
func defaultZstdWindow(level int) int {
	if level == 1 {
		return 4 << 20
	}
	return 8 << 20
}
