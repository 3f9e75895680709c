package cow

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
)

// The journal is a sequence of frames; each frame is one atomic batch of
// metadata records:
//
//	magic u32 | payload length u32 | crc32c(payload) u32 | payload
//	payload = seq u64 | records (recSize bytes each)
//
// The first frame of a journal file is a checkpoint (a full description of
// the region's files); later frames are the batches committed by Sync.
// Replay stops at the first torn or corrupt frame and truncates there.
const (
	frameMagic  = 0x314a5344 // "DSJ1"
	frameHeader = 12
	recSize     = 1 + 5*8
	journalName = "journal"
	dataName    = "data"
)

// record types.
const (
	recCheckpoint = 1 + iota // A=version, B=block size
	recCreate                // ID
	recRemove                // ID
	recAttr                  // ID, A=size, B=baseSize, C=baseLen, D=flags
	recMap                   // ID, A=logical, B=physical, C=count (blocks)
	recUnmap                 // ID, A=logical, B=count (blocks)
)

const attrHasBase = 1

type record struct {
	T              uint8
	ID, A, B, C, D uint64
}

var crcTable = crc32.MakeTable(crc32.Castagnoli)

func appendRecord(b []byte, r record) []byte {
	b = append(b, r.T)
	for _, v := range []uint64{r.ID, r.A, r.B, r.C, r.D} {
		b = binary.LittleEndian.AppendUint64(b, v)
	}
	return b
}

// encodeFrame builds one frame holding recs.
func encodeFrame(seq uint64, recs []record) []byte {
	payload := make([]byte, 8, 8+len(recs)*recSize)
	binary.LittleEndian.PutUint64(payload, seq)
	for _, r := range recs {
		payload = appendRecord(payload, r)
	}
	out := make([]byte, frameHeader, frameHeader+len(payload))
	binary.LittleEndian.PutUint32(out[0:], frameMagic)
	binary.LittleEndian.PutUint32(out[4:], uint32(len(payload)))
	binary.LittleEndian.PutUint32(out[8:], crc32.Checksum(payload, crcTable))
	return append(out, payload...)
}

// decodeFrames parses buf into frames; it returns the frames that are
// complete and intact, and the byte length they cover.
func decodeFrames(buf []byte) (frames [][]record, valid int64) {
	off := 0
	for off+frameHeader <= len(buf) {
		if binary.LittleEndian.Uint32(buf[off:]) != frameMagic {
			break
		}
		n := int(binary.LittleEndian.Uint32(buf[off+4:]))
		sum := binary.LittleEndian.Uint32(buf[off+8:])
		if n < 8 || (n-8)%recSize != 0 || off+frameHeader+n > len(buf) {
			break
		}
		payload := buf[off+frameHeader : off+frameHeader+n]
		if crc32.Checksum(payload, crcTable) != sum {
			break
		}
		var recs []record
		for p := payload[8:]; len(p) >= recSize; p = p[recSize:] {
			r := record{T: p[0]}
			r.ID = binary.LittleEndian.Uint64(p[1:])
			r.A = binary.LittleEndian.Uint64(p[9:])
			r.B = binary.LittleEndian.Uint64(p[17:])
			r.C = binary.LittleEndian.Uint64(p[25:])
			r.D = binary.LittleEndian.Uint64(p[33:])
			recs = append(recs, r)
		}
		frames = append(frames, recs)
		off += frameHeader + n
	}
	return frames, int64(off)
}

// journal is the append side of the metadata log.
type journal struct {
	dir  string
	f    *os.File
	size int64
	seq  uint64
	// ckptSize is the size of the last checkpoint frame (compaction trigger).
	ckptSize int64
}

// openJournal reads and validates the journal, truncating any torn tail.
func openJournal(dir string) (*journal, [][]record, error) {
	path := filepath.Join(dir, journalName)
	_ = os.Remove(path + ".tmp") // a checkpoint that never got renamed
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, nil, fmt.Errorf("cow: open journal: %w", err)
	}
	buf, err := io.ReadAll(f)
	if err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("cow: read journal: %w", err)
	}
	frames, valid := decodeFrames(buf)
	if valid != int64(len(buf)) {
		// Torn tail of a batch that never completed its fsync: drop it so
		// new frames are not appended after garbage.
		if err := f.Truncate(valid); err != nil {
			f.Close()
			return nil, nil, fmt.Errorf("cow: truncate torn journal: %w", err)
		}
		if err := f.Sync(); err != nil {
			f.Close()
			return nil, nil, fmt.Errorf("cow: sync journal: %w", err)
		}
	}
	j := &journal{dir: dir, f: f, size: valid, seq: uint64(len(frames))}
	if len(frames) > 0 {
		j.ckptSize = int64(frameHeader + 8 + len(frames[0])*recSize)
	}
	return j, frames, nil
}

// append writes one frame and fsyncs it.
func (j *journal) append(recs []record) error {
	j.seq++
	b := encodeFrame(j.seq, recs)
	if _, err := j.f.WriteAt(b, j.size); err != nil {
		return fmt.Errorf("cow: append journal: %w", err)
	}
	if err := j.f.Sync(); err != nil {
		return fmt.Errorf("cow: fsync journal: %w", err)
	}
	j.size += int64(len(b))
	return nil
}

// checkpoint atomically replaces the journal with a single frame holding
// recs (the full state): write a temp file, fsync, rename, fsync the dir.
func (j *journal) checkpoint(recs []record) error {
	path := filepath.Join(j.dir, journalName)
	tmp := path + ".tmp"
	b := encodeFrame(1, recs)
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("cow: checkpoint: %w", err)
	}
	if _, err := f.Write(b); err == nil {
		err = f.Sync()
	}
	if err != nil {
		f.Close()
		os.Remove(tmp)
		return fmt.Errorf("cow: write checkpoint: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		f.Close()
		return fmt.Errorf("cow: install checkpoint: %w", err)
	}
	if err := syncDir(j.dir); err != nil {
		f.Close()
		return err
	}
	old := j.f
	j.f, j.size, j.seq, j.ckptSize = f, int64(len(b)), 1, int64(len(b))
	if old != nil {
		old.Close()
	}
	return nil
}

func (j *journal) close() error {
	if j.f == nil {
		return nil
	}
	err := j.f.Close()
	j.f = nil
	return err
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("cow: open dir for fsync: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil && !errors.Is(err, os.ErrInvalid) {
		return fmt.Errorf("cow: fsync dir: %w", err)
	}
	return nil
}
