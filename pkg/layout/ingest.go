package layout

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"strings"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/dupsnap/dupsnap/pkg/cas"
)

// putter is the part of *cas.Batch that ingest needs.
type putter interface {
	Put(ctx context.Context, r io.Reader) (digest.Digest, int64, error)
}

// payloadPutter is a putter that can name content that is verbatim the tar
// payload of entry (see Verify) without hashing it.
type payloadPutter interface {
	PutPayload(ctx context.Context, entry int, r io.Reader) (digest.Digest, int64, error)
}

// Ingest reads a layer (plain tar, gzip or zstd, detected by magic), puts
// every file content into the CAS through b (the caller commits b) and
// returns the manifest with DiffID = sha256 of the uncompressed tar.
// Hostile input is refused with an error wrapping ErrInvalidLayer.
func Ingest(ctx context.Context, b *cas.Batch, r io.Reader, opts IngestOptions) (*Manifest, error) {
	return ingest(ctx, b, r, opts)
}

// onlyReader hides the tar reader's other methods so copies go through Read.
type onlyReader struct{ r io.Reader }

func (o onlyReader) Read(p []byte) (int, error) { return o.r.Read(p) }

func ingest(ctx context.Context, p putter, r io.Reader, opts IngestOptions) (m *Manifest, err error) {
	opts = opts.withDefaults()
	plain, comp, release, err := decompress(r)
	if err != nil {
		return nil, err
	}
	if _, ok := p.(payloadPutter); ok && comp != Uncompressed {
		release()
		return nil, fmt.Errorf("%w: rebuilt tar starts like a %s stream", ErrInvalidLayer, comp)
	}
	hr := newHashReader(plain, opts.MaxSize)
	defer release()
	defer hr.close()

	in := &ingester{
		ctx:   ctx,
		p:     p,
		opts:  opts,
		rec:   &recorder{r: hr, limit: opts.maxPending(), pending: make([]byte, 0, 1024)},
		links: symlinkGuard{},
		m:     &Manifest{},
	}
	if err := in.run(); err != nil {
		// Classify: anything the stream itself caused is an invalid layer.
		if errors.Is(err, ErrInvalidLayer) || ctx.Err() != nil {
			return nil, err
		}
		if in.rec.err != nil || isTarErr(err) {
			return nil, fmt.Errorf("%w (%s): %v", ErrInvalidLayer, comp, err)
		}
		return nil, err
	}
	sum, total := hr.sum()
	in.m.DiffID = digest.NewDigestFromBytes(digest.SHA256, sum)
	in.m.Size = total
	log.G(ctx).WithFields(log.Fields{"diff_id": in.m.DiffID, "entries": len(in.m.Entries), "size": total, "compression": comp}).Debug("layer ingested")
	return in.m, nil
}

func isTarErr(err error) bool {
	return errors.Is(err, tar.ErrHeader) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, tar.ErrFieldTooLong) || errors.Is(err, errTooLarge) ||
		strings.HasPrefix(err.Error(), "archive/tar:")
}

type ingester struct {
	ctx       context.Context
	p         putter
	opts      IngestOptions
	rec       *recorder
	links     symlinkGuard
	m         *Manifest
	emptyDone bool
}

func (in *ingester) run() error {
	tr := tar.NewReader(in.rec)
	for {
		if err := in.ctx.Err(); err != nil {
			return err
		}
		in.rec.payload = false
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("entry %d: %w", len(in.m.Entries), err)
		}
		if hdr.Typeflag == tar.TypeXGlobalHeader || hdr.Typeflag == 'V' {
			// Metadata without an entry: its bytes stay pending and are
			// stored in front of the next entry's header.
			continue
		}
		if len(in.m.Entries) >= in.opts.MaxEntries {
			return fmt.Errorf("%w: more than %d entries", ErrInvalidLayer, in.opts.MaxEntries)
		}
		if err := in.entry(tr, hdr); err != nil {
			return err
		}
	}
	// End of archive: keep the end blocks and whatever trails them (GNU tar
	// pads to its record size) so the export is byte-identical.
	in.rec.payload = false
	n, err := io.Copy(io.Discard, io.LimitReader(in.rec, in.opts.maxPending()+1))
	if err != nil {
		return fmt.Errorf("after end of archive: %w", err)
	}
	if n > in.opts.maxPending() {
		return fmt.Errorf("%w: more than %d bytes after the end of the archive", ErrInvalidLayer, in.opts.maxPending())
	}
	in.m.raw.tail = in.rec.take()
	return nil
}

func (in *ingester) entry(tr *tar.Reader, hdr *tar.Header) error {
	e, err := in.convert(hdr)
	if err != nil {
		return err
	}
	seg := rawSeg{}
	in.rec.payload = true
	in.rec.payN = 0
	switch {
	case e.Type == TypeFile:
		if err := in.putFile(tr, hdr, &e, &seg); err != nil {
			return err
		}
	case hdr.Typeflag == 'D' && hdr.Size > 0:
		// GNU dumpdir: the data section lists the directory's names; keep it
		// as an object so the export can rebuild it.
		d, n, err := in.put(io.LimitReader(onlyReader{tr}, in.opts.MaxHeaderLen), true)
		if err != nil {
			return fmt.Errorf("entry %q: dumpdir data: %w", e.Path, err)
		}
		seg.payDigest = d
		_ = n
	}
	// Anything left in the data section would be lost: refuse it.
	if n, err := io.Copy(io.Discard, onlyReader{tr}); err != nil {
		return fmt.Errorf("entry %q: %w", e.Path, err)
	} else if n > 0 {
		return fmt.Errorf("%w: entry %q: %d unexpected data bytes", ErrInvalidLayer, e.Path, n)
	}
	in.rec.payload = false
	seg.paySize = in.rec.payN
	if seg.payDigest == "" && seg.paySize != e.Size {
		return fmt.Errorf("%w: entry %q: archived %d bytes for size %d", ErrInvalidLayer, e.Path, seg.paySize, e.Size)
	}
	seg.hdr = in.rec.take()
	in.m.Entries = append(in.m.Entries, e)
	in.m.raw.segs = append(in.m.raw.segs, seg)
	return nil
}

func (in *ingester) putFile(tr *tar.Reader, hdr *tar.Header, e *Entry, seg *rawSeg) error {
	if hdr.Size == 0 && !isSparse(hdr) {
		e.Digest = emptyDigest
		if !in.emptyDone {
			if _, _, err := in.p.Put(in.ctx, bytes.NewReader(nil)); err != nil {
				return fmt.Errorf("entry %q: %w", e.Path, err)
			}
			in.emptyDone = true
		}
		return nil
	}
	var spool *spoolFile
	if isSparse(hdr) {
		// Only the data fragments are archived: keep them as an object of
		// their own besides the expanded content.
		spool = &spoolFile{limit: in.opts.MaxFileSize}
		defer spool.Close()
		in.rec.spool = spool
		defer func() { in.rec.spool = nil }()
	}
	// A sparse file's content is its expansion, not the archived payload.
	d, n, err := in.put(onlyReader{tr}, spool == nil)
	if err != nil {
		return fmt.Errorf("entry %q: %w", e.Path, err)
	}
	if n != hdr.Size {
		return fmt.Errorf("%w: entry %q: read %d of %d bytes", ErrInvalidLayer, e.Path, n, hdr.Size)
	}
	e.Digest = d
	if spool != nil {
		in.rec.spool = nil
		rd, err := spool.reader()
		if err != nil {
			return fmt.Errorf("entry %q: sparse spool: %w", e.Path, err)
		}
		pd, _, err := in.p.Put(in.ctx, rd)
		if err != nil {
			return fmt.Errorf("entry %q: archived sparse data: %w", e.Path, err)
		}
		seg.payDigest = pd
	}
	return nil
}

// put stores content; payload says it is verbatim the current entry's tar
// payload.
func (in *ingester) put(r io.Reader, payload bool) (digest.Digest, int64, error) {
	if pp, ok := in.p.(payloadPutter); ok && payload {
		return pp.PutPayload(in.ctx, len(in.m.Entries), r)
	}
	return in.p.Put(in.ctx, r)
}

func isSparse(hdr *tar.Header) bool {
	if hdr.Typeflag == tar.TypeGNUSparse {
		return true
	}
	for k := range hdr.PAXRecords {
		if strings.HasPrefix(k, "GNU.sparse.") {
			return true
		}
	}
	return false
}

// convert validates a header and turns it into an Entry.
func (in *ingester) convert(hdr *tar.Header) (Entry, error) {
	p, err := cleanPath(hdr.Name)
	if err != nil {
		return Entry{}, err
	}
	e := Entry{
		Path:       p,
		Mode:       uint32(hdr.Mode) & 07777,
		UID:        hdr.Uid,
		GID:        hdr.Gid,
		ModTime:    hdr.ModTime,
		AccessTime: hdr.AccessTime,
		ChangeTime: hdr.ChangeTime,
	}
	if hdr.Uid < 0 || hdr.Gid < 0 || hdr.Mode < 0 {
		return Entry{}, fmt.Errorf("%w: %q: negative uid/gid/mode", ErrInvalidLayer, hdr.Name)
	}
	switch hdr.Typeflag {
	case tar.TypeReg, tar.TypeCont, tar.TypeGNUSparse:
		e.Type = TypeFile
		if hdr.Size < 0 || hdr.Size > in.opts.MaxFileSize {
			return Entry{}, fmt.Errorf("%w: %q: size %d over limit %d", ErrInvalidLayer, hdr.Name, hdr.Size, in.opts.MaxFileSize)
		}
		e.Size = hdr.Size
	case tar.TypeLink:
		e.Type = TypeHardlink
		l, err := cleanPath(hdr.Linkname)
		if err != nil {
			return Entry{}, fmt.Errorf("hardlink %q: %w", hdr.Name, err)
		}
		if err := in.links.check(l); err != nil {
			return Entry{}, err
		}
		e.Linkname = l
	case tar.TypeSymlink:
		e.Type = TypeSymlink
		if hdr.Linkname == "" {
			return Entry{}, fmt.Errorf("%w: symlink %q without target", ErrInvalidLayer, hdr.Name)
		}
		e.Linkname = hdr.Linkname
	case tar.TypeChar, tar.TypeBlock:
		e.Type = EntryType(hdr.Typeflag)
		if hdr.Devmajor < 0 || hdr.Devminor < 0 || hdr.Devmajor > 1<<32-1 || hdr.Devminor > 1<<32-1 {
			return Entry{}, fmt.Errorf("%w: %q: bad device numbers", ErrInvalidLayer, hdr.Name)
		}
		e.Devmajor, e.Devminor = uint32(hdr.Devmajor), uint32(hdr.Devminor)
	case tar.TypeFifo:
		e.Type = TypeFifo
	case tar.TypeDir, 'D':
		e.Type = TypeDir
	default:
		return Entry{}, fmt.Errorf("%w: %q: unsupported entry type %q", ErrInvalidLayer, hdr.Name, hdr.Typeflag)
	}
	for k, v := range hdr.PAXRecords {
		if name, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok {
			if e.Xattrs == nil {
				e.Xattrs = map[string]string{}
			}
			e.Xattrs[name] = v
		}
	}
	if err := in.links.check(p); err != nil {
		return Entry{}, err
	}
	base := path.Base(p)
	switch {
	case base == whiteoutOpaque:
		e.Opaque = true
		e.Path = parentDir(p)
	case strings.HasPrefix(base, whiteoutMetaPrefix):
		// aufs metadata (.wh..wh.plnk ...): kept for the export, skipped by Merge.
	case strings.HasPrefix(base, whiteoutPrefix):
		name := base[len(whiteoutPrefix):]
		if name == "" || name == "." || name == ".." {
			return Entry{}, fmt.Errorf("%w: bad whiteout %q", ErrInvalidLayer, hdr.Name)
		}
		e.Whiteout = true
		e.Path = path.Join(parentDir(p), name)
	default:
		in.links.set(p, e.Type == TypeSymlink)
	}
	return e, nil
}

// spoolFile buffers a sparse entry's archived bytes: in memory while small,
// then in a temp file (only that entry, never the whole layer).
type spoolFile struct {
	buf   bytes.Buffer
	f     *os.File
	n     int64
	limit int64
}

const spoolMem = 4 << 20

func (s *spoolFile) Write(p []byte) (int, error) {
	s.n += int64(len(p))
	if s.n > s.limit {
		return 0, fmt.Errorf("%w: sparse data over %d bytes", errTooLarge, s.limit)
	}
	if s.f == nil && s.buf.Len()+len(p) <= spoolMem {
		return s.buf.Write(p)
	}
	if s.f == nil {
		f, err := os.CreateTemp("", "dupsnap-sparse-*")
		if err != nil {
			return 0, err
		}
		_ = os.Remove(f.Name())
		s.f = f
		if _, err := f.Write(s.buf.Bytes()); err != nil {
			return 0, err
		}
		s.buf = bytes.Buffer{}
	}
	return s.f.Write(p)
}

func (s *spoolFile) reader() (io.Reader, error) {
	if s.f == nil {
		return bytes.NewReader(s.buf.Bytes()), nil
	}
	if _, err := s.f.Seek(0, io.SeekStart); err != nil {
		return nil, err
	}
	return s.f, nil
}

func (s *spoolFile) Close() error {
	if s.f != nil {
		return s.f.Close()
	}
	return nil
}
