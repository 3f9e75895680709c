package snapshotter

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/containerd/log"
)

// Trash: a committed unpack's staging dir holds one name per file of the
// layer (the data is the CAS's now, by adoption). Unlinking them took up
// to half a second per layer in Commit, on the pull's critical path, so
// the dir is renamed into <root>/trash and deleted in the background, one
// dir at a time. What a crash leaves there is deleted at the next start.

func (s *Snapshotter) trashDir() string { return filepath.Join(s.root, "trash") }

// trash moves dir (no mounts below it) into the trash and deletes it in the
// background. If the rename fails, the caller's own removal deletes it.
func (s *Snapshotter) trash(ctx context.Context, dir string) {
	if err := os.MkdirAll(s.trashDir(), 0o700); err != nil {
		return
	}
	dst := filepath.Join(s.trashDir(), filepath.Base(filepath.Dir(dir))+"-"+strconv.FormatInt(time.Now().UnixNano(), 36))
	if err := os.Rename(dir, dst); err != nil {
		log.G(ctx).WithError(err).Debug("moving staging dir to trash")
		return
	}
	s.deleteLater(ctx, dst)
}

func (s *Snapshotter) deleteLater(ctx context.Context, dir string) {
	s.bg.Add(1)
	go func() {
		defer s.bg.Done()
		s.trashMu.Lock()
		defer s.trashMu.Unlock()
		if err := os.RemoveAll(dir); err != nil {
			log.G(ctx).WithError(err).WithField("path", dir).Warn("emptying trash")
		}
	}()
}

// emptyTrash deletes what earlier runs left in the trash.
func (s *Snapshotter) emptyTrash(ctx context.Context) {
	des, err := os.ReadDir(s.trashDir())
	if err != nil {
		return
	}
	for _, de := range des {
		s.deleteLater(context.WithoutCancel(ctx), filepath.Join(s.trashDir(), de.Name()))
	}
}
