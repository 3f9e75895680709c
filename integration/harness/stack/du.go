package stack

import (
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
)

// DiskUsage is the allocated bytes (st_blocks) of the files under dir,
// each inode counted once, not descending into other filesystems (the
// FUSE and overlay mounts of running containers) and 0 if dir is missing.
func DiskUsage(dir string) int64 {
	var root syscall.Stat_t
	if err := syscall.Stat(dir, &root); err != nil {
		return 0
	}
	seen := map[uint64]bool{}
	var total int64
	filepath.WalkDir(dir, func(p string, de fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		var st syscall.Stat_t
		if syscall.Lstat(p, &st) != nil {
			return nil
		}
		if st.Dev != root.Dev {
			if de.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		if seen[st.Ino] {
			return nil
		}
		seen[st.Ino] = true
		total += st.Blocks * 512
		return nil
	})
	return total
}

// FileSize is the apparent size of a file, 0 if missing.
func FileSize(p string) int64 {
	st, err := os.Stat(p)
	if err != nil {
		return 0
	}
	return st.Size()
}
