package recipe

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/dupsnap/dupsnap/proxy/recipe/internal/goflate"
)

const (
	// checkpointEvery is the tar distance between checkpoints: small enough
	// to keep many cores busy on a layer of a few MiB, large enough that the
	// per-chunk cost (re-hashing 32 KiB, 128 KiB of overlap) stays ~2%.
	checkpointEvery = 256 << 10
	// maxCheckpoints bounds the recipe (~20 bytes each); bigger layers get
	// longer chunks.
	maxCheckpoints = 1024
)

// checkpointable: recipes whose encoder goflate can resume.
func (r *Recipe) checkpointable() bool {
	return r.Format == FormatGzip && r.enc == encGoFlate && goflate.Supported(r.level)
}

// addCheckpoints gives r (proven by goflate's capturing run, which recorded
// cps) its checkpoints if the chunked re-compression reproduces the blob.
func (r *Recipe) addCheckpoints(ctx context.Context, blob io.ReaderAt, blobSize int64, d digest.Digest, tar func() (io.ReadCloser, error), cps []goflate.Checkpoint) (bool, error) {
	for step := 2; len(cps) > maxCheckpoints; step++ {
		var thin []goflate.Checkpoint
		for i := step - 1; i < len(cps); i += step {
			thin = append(thin, cps[i])
		}
		cps = thin
	}
	c := *r
	c.cps = cps
	c.crcs = make([]uint32, len(cps)+1)
	for i := range c.crcs {
		off := int64(len(r.header)) + c.chunkStart(i).Bit/8
		b := make([]byte, c.chunkBytes(i))
		if _, err := blob.ReadAt(b, off); err != nil {
			return false, fmt.Errorf("recipe: checkpoints: read blob: %w", err)
		}
		c.crcs[i] = crc32.Checksum(b, castagnoli)
	}
	rc, err := tar()
	if err != nil {
		return false, fmt.Errorf("recipe: checkpoints: open tar: %w", err)
	}
	defer rc.Close()
	v := d.Verifier()
	n, err := c.applyChunked(ctx, v, rc)
	switch {
	case ctx.Err() != nil:
		return false, fmt.Errorf("recipe: checkpoints: %w", ctx.Err())
	case err != nil || n != blobSize || !v.Verified():
		log.G(ctx).WithError(err).WithField("digest", d).Warn("recipe: chunked re-compression does not reproduce the blob: sequential restore only")
		return false, nil
	}
	r.cps, r.crcs = c.cps, c.crcs
	return true, nil
}

// capture runs goflate's capturing encoder over the tar, comparing with the
// blob as it goes; ok only if it reproduces the whole blob.
func (r *Recipe) capture(ctx context.Context, blob io.ReaderAt, blobSize int64, d digest.Digest, tar func() (io.ReadCloser, error)) ([]goflate.Checkpoint, bool, error) {
	rc, err := tar()
	if err != nil {
		return nil, false, fmt.Errorf("recipe: checkpoints: open tar: %w", err)
	}
	defer rc.Close()
	cw := &compareWriter{blob: blob, size: blobSize, h: d.Algorithm().Hash()}
	c, err := goflate.NewCapture(cw, r.level, checkpointEvery)
	if err != nil {
		return nil, false, err
	}
	crc := crc32.NewIEEE()
	var size int64
	_, err = cw.Write(r.header)
	if err == nil {
		var n int64
		n, err = io.CopyBuffer(io.MultiWriter(c, crc), ctxReader{ctx, rc}, make([]byte, 256<<10))
		size = n
	}
	if err == nil {
		err = c.Close()
	}
	if err == nil {
		var t [8]byte
		binary.LittleEndian.PutUint32(t[:4], crc.Sum32())
		binary.LittleEndian.PutUint32(t[4:], uint32(size))
		_, err = cw.Write(t[:])
	}
	switch {
	case errors.Is(err, errMismatch):
		return nil, false, nil
	case err != nil && ctx.Err() != nil:
		return nil, false, fmt.Errorf("recipe: checkpoints: %w", ctx.Err())
	case err != nil:
		return nil, false, fmt.Errorf("recipe: checkpoints: %w", err)
	}
	if cw.off != blobSize || digest.NewDigest(d.Algorithm(), cw.h) != d {
		return nil, false, nil
	}
	return c.Checkpoints(), true, nil
}

// marshalChunks encodes checkpoints and CRCs compactly (varint deltas).
func (r *Recipe) marshalChunks() []byte {
	b := binary.AppendUvarint(nil, uint64(len(r.cps)))
	prev := r.chunkStart(0)
	for _, c := range r.cps {
		b = binary.AppendUvarint(b, uint64(c.Pos-prev.Pos))
		b = binary.AppendUvarint(b, uint64(c.Pos-c.Base))
		b = binary.AppendUvarint(b, uint64(c.Index))
		b = binary.AppendUvarint(b, uint64(c.Length))
		b = binary.AppendUvarint(b, uint64(c.Offset))
		avail := byte(0)
		if c.ByteAvail {
			avail = 1
		}
		b = append(b, avail)
		b = binary.AppendUvarint(b, uint64(c.Bit-prev.Bit))
		prev = c
	}
	for _, c := range r.crcs {
		b = binary.BigEndian.AppendUint32(b, c)
	}
	return b
}

func (r *Recipe) unmarshalChunks(b []byte) error {
	br := bytes.NewReader(b)
	u := func() int64 {
		v, err := binary.ReadUvarint(br)
		if err != nil || v > 1<<62 {
			return -1
		}
		return int64(v)
	}
	n := u()
	if n <= 0 || n > maxCheckpoints || r.size <= 0 {
		return fmt.Errorf("bad checkpoint count %d", n)
	}
	prev := goflate.Checkpoint{Length: 3}
	cps := make([]goflate.Checkpoint, n)
	for i := range cps {
		dPos, back, idx, length, off := u(), u(), u(), u(), u()
		avail, err := br.ReadByte()
		dBit := u()
		if dPos <= 0 || back < 0 || idx < 0 || idx >= 1<<16 || length < 0 || length > 258 || off < 0 || off > 1<<15 || err != nil || avail > 1 || dBit < 0 {
			return fmt.Errorf("bad checkpoint %d", i)
		}
		c := goflate.Checkpoint{Pos: prev.Pos + dPos, Index: int32(idx), Length: int32(length), Offset: int32(off), ByteAvail: avail == 1, Bit: prev.Bit + dBit}
		c.Base = c.Pos - back
		if c.Bit/8 > r.deflateSize() || c.Base < prev.Base {
			return fmt.Errorf("bad checkpoint %d", i)
		}
		cps[i], prev = c, c
	}
	crcs := make([]uint32, n+1)
	for i := range crcs {
		var t [4]byte
		if _, err := io.ReadFull(br, t[:]); err != nil {
			return errors.New("checkpoint checksums truncated")
		}
		crcs[i] = binary.BigEndian.Uint32(t[:])
	}
	if br.Len() != 0 {
		return errors.New("trailing bytes after checkpoints")
	}
	r.cps, r.crcs = cps, crcs
	return nil
}

// Upgradable reports whether AddCheckpoints may give r checkpoints: a
// compress/flate level 4-9 recipe stored before they existed (version 1).
func (r *Recipe) Upgradable() bool { return r.checkpointable() && !r.chunked() }

// AddCheckpoints upgrades an Upgradable recipe from the blob it restores
// (verified) and its tar: goflate's capturing run must reproduce the blob
// and so must the chunked run. It reports whether r now has checkpoints;
// (false, nil) leaves r as it was.
func (r *Recipe) AddCheckpoints(ctx context.Context, blob io.ReaderAt, blobSize int64, d digest.Digest, tar func() (io.ReadCloser, error)) (bool, error) {
	if !r.Upgradable() || blobSize != r.size {
		return false, nil
	}
	cps, ok, err := r.capture(ctx, blob, blobSize, d, tar)
	if err != nil || !ok || len(cps) == 0 {
		return false, err
	}
	return r.addCheckpoints(ctx, blob, blobSize, d, tar, cps)
}

// Sequential returns r without checkpoints (as a version 1 recipe).
func (r *Recipe) Sequential() *Recipe {
	c := *r
	c.cps, c.crcs = nil, nil
	return &c
}
