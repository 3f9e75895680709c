package rootfs

import (
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// readaheadKiB is the readahead window of a rootfs mount. The kernel gives
// a FUSE mount its bdi's default (128 KiB), so a sequential read of a
// region file (modified image file, new file) that is not cached yet costs
// one daemon round trip per 128 KiB; with 1 MiB (= MaxWrite, the largest
// request) it costs an eighth of them: measured ~1.5x on the first read of
// a partly modified 256 MiB file. Passthrough files are not affected (the
// backing file's own readahead applies).
const readaheadKiB = 1024

// setReadahead sets the readahead window of the FUSE mount at mp (its
// anonymous bdi, named by the mount's device number).
func setReadahead(mp string, kib int) error {
	var st syscall.Stat_t
	if err := syscall.Stat(mp, &st); err != nil {
		return fmt.Errorf("rootfs: readahead of %s: %w", mp, err)
	}
	p := fmt.Sprintf("/sys/class/bdi/%d:%d/read_ahead_kb", unix.Major(st.Dev), unix.Minor(st.Dev))
	if err := os.WriteFile(p, []byte(fmt.Sprint(kib)), 0); err != nil {
		return fmt.Errorf("rootfs: readahead of %s: %w", mp, err)
	}
	return nil
}
