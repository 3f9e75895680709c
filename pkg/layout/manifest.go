package layout

import (
	"io"
	"slices"

	"github.com/opencontainers/go-digest"
)

// rawLayer holds every non-payload byte of the tar, split at the payloads:
// segs[i] precedes Entries[i]'s data section, tail follows the last one.
type rawLayer struct {
	segs []rawSeg
	tail []byte // padding, end-of-archive blocks and anything after them
}

// rawSeg is what sits in the tar before and in an entry's data section.
type rawSeg struct {
	// hdr is every byte between the previous data section and this entry's:
	// padding, PAX/GNU records, global headers, the header block(s), sparse map.
	hdr []byte
	// paySize is the length of the archived data section.
	paySize int64
	// payDigest names the archived data section when it is not the entry's
	// content itself (sparse files: only the data fragments are archived;
	// GNU dumpdirs). Empty: the payload is Entry.Digest (paySize == Entry.Size).
	payDigest digest.Digest
}

// Source is where Export reads objects from; *cas.Store satisfies it.
type Source interface {
	Open(d digest.Digest) (io.ReadCloser, error)
}

// Objects returns the unique content digests the manifest references
// (file contents and archived forms), sorted.
func (m *Manifest) Objects() []digest.Digest {
	seen := make(map[digest.Digest]struct{}, len(m.Entries))
	for _, e := range m.Entries {
		if e.Type == TypeFile && e.Digest != "" {
			seen[e.Digest] = struct{}{}
		}
	}
	for _, s := range m.raw.segs {
		if s.payDigest != "" {
			seen[s.payDigest] = struct{}{}
		}
	}
	out := make([]digest.Digest, 0, len(seen))
	for d := range seen {
		out = append(out, d)
	}
	slices.Sort(out)
	return out
}

// ContentBytes is the sum of the sizes of the manifest's regular files (the
// logical bytes a filesystem would show).
func (m *Manifest) ContentBytes() int64 {
	var n int64
	for _, e := range m.Entries {
		if e.Type == TypeFile {
			n += e.Size
		}
	}
	return n
}

// Files counts regular file entries (whiteout markers excluded).
func (m *Manifest) Files() int {
	n := 0
	for _, e := range m.Entries {
		if e.Type == TypeFile && !e.Whiteout && !e.Opaque {
			n++
		}
	}
	return n
}

// ObjectSizes maps each referenced object to its size.
func (m *Manifest) ObjectSizes() map[digest.Digest]int64 {
	out := make(map[digest.Digest]int64, len(m.Entries))
	for i, e := range m.Entries {
		if e.Type == TypeFile && e.Digest != "" {
			out[e.Digest] = e.Size
		}
		if i < len(m.raw.segs) && m.raw.segs[i].payDigest != "" {
			out[m.raw.segs[i].payDigest] = m.raw.segs[i].paySize
		}
	}
	return out
}

// emptyDigest is the digest of zero bytes (every empty file has it).
var emptyDigest = digest.SHA256.FromBytes(nil)
