package stack

import (
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// SaveLogs copies every *.log under dir into dst (flattened, path joined
// with '_'), so that they outlive the run's cleanup.
func SaveLogs(dir, dst string) error {
	os.RemoveAll(dst)
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return err
	}
	var top syscall.Stat_t
	if err := syscall.Stat(dir, &top); err != nil {
		return err
	}
	return filepath.WalkDir(dir, func(p string, de fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		if de.IsDir() {
			// Never cross into a mount (a FUSE server may be gone).
			var st syscall.Stat_t
			if syscall.Lstat(p, &st) != nil || st.Dev != top.Dev {
				return filepath.SkipDir
			}
			// Never descend into container rootfs or snapshot mounts.
			if strings.Contains(p, "snapshots") || strings.Contains(p, "io.containerd") || strings.HasSuffix(p, "/cas") {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(p, ".log") || !de.Type().IsRegular() {
			return nil
		}
		rel, _ := filepath.Rel(dir, p)
		src, err := os.Open(p)
		if err != nil {
			return nil
		}
		defer src.Close()
		out, err := os.Create(filepath.Join(dst, strings.ReplaceAll(rel, "/", "_")))
		if err != nil {
			return nil
		}
		defer out.Close()
		_, _ = io.Copy(out, src)
		return nil
	})
}
