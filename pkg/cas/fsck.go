package cas

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"

	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

// Fsck re-hashes every object (decompressing compressed ones and checking
// their recorded size). With repair, corrupt objects are removed and, under
// the exclusive lock (so no live put loses its temp files), so are temp
// files. Without repair, TempFiles counts temps present, live or stale.
func (s *Store) Fsck(ctx context.Context, repair bool) (FsckReport, error) {
	var (
		rep  FsckReport
		mu   sync.Mutex
		wg   sync.WaitGroup
		work = make(chan [2]string)
		ferr error
	)
	for w := 0; w < max(1, runtime.GOMAXPROCS(0)); w++ {
		wg.Go(func() {
			for item := range work {
				d := digest.Digest(item[0])
				size, ok, err := s.verify(d, item[1])
				mu.Lock()
				switch {
				case err != nil:
					if ferr == nil {
						ferr = err
					}
				case !ok:
					rep.Corrupt = append(rep.Corrupt, d)
				default:
					rep.Objects++
					rep.Bytes += size
				}
				mu.Unlock()
			}
		})
	}
	werr := s.walkNames(ctx, func(d digest.Digest, name string) error {
		select {
		case work <- [2]string{string(d), name}:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	})
	close(work)
	wg.Wait()
	if werr != nil {
		return rep, werr
	}
	if ferr != nil {
		return rep, ferr
	}
	sort.Slice(rep.Corrupt, func(i, j int) bool { return rep.Corrupt[i] < rep.Corrupt[j] })
	for _, d := range rep.Corrupt {
		log.G(ctx).WithField("digest", d).Warn("cas: fsck: corrupt object")
	}

	temps, err := readDirNames(filepath.Join(s.root, tmpDirName))
	if err != nil {
		return rep, err
	}
	rep.TempFiles = len(temps)
	if !repair {
		return rep, nil
	}
	for _, d := range rep.Corrupt {
		if err := s.Delete(d); err != nil && !errors.Is(err, ErrNotFound) {
			return rep, err
		}
	}
	if rep.TempFiles > 0 {
		release, err := s.lk.exclusive(ctx)
		if err != nil {
			return rep, err
		}
		_, err = s.sweepTempsLocked()
		release()
		if err != nil {
			return rep, err
		}
	}
	rep.Repaired = true
	return rep, nil
}

// verify re-hashes one object; ok=false means corrupt (unreadable content
// counts as corrupt, an I/O error opening it does not).
func (s *Store) verify(d digest.Digest, name string) (size int64, ok bool, err error) {
	fd, err := unix.Openat(s.objFd, name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return 0, true, nil // deleted meanwhile
		}
		return 0, false, fmt.Errorf("cas: fsck open %s: %w", name, err)
	}
	f := fileFromFd(fd, name)
	var r io.ReadCloser = f
	var want int64 = -1
	if strings.HasSuffix(name, zstSuffix) {
		if want, err = readZSize(fd); err != nil {
			f.Close()
			return 0, false, nil
		}
		z, err := newZstdFile(f)
		if err != nil {
			f.Close()
			return 0, false, nil
		}
		r = z
	}
	defer r.Close()
	pb := getBuf()
	defer putBuf(pb)
	h := sha256.New()
	n, err := io.CopyBuffer(struct{ hash.Hash }{h}, r, *pb)
	if err != nil {
		return n, false, nil
	}
	if want >= 0 && n != want {
		return n, false, nil
	}
	return n, digest.NewDigestFromBytes(digest.SHA256, h.Sum(nil)) == d, nil
}
