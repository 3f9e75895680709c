package rootfs

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/dupsnap/dupsnap/pkg/cow"
)

// Spare regions: creating a region writes and fsyncs its first journal
// checkpoint and its dir, which on a busy disk cost a container start
// 5-30 ms. Opening a region that already has exactly that checkpoint
// syncs nothing. So servers keep a few empty regions ready in a pool next
// to the manifests (per block size); a new active snapshot's server
// renames one into its state dir instead of creating one, and refills the
// pool after its mount is up.
//
// Durability is that of creating the region in place: a spare was made
// with all of cow's fsyncs, and the rename into the state dir is a
// metadata operation like the mkdir it replaces (not fsync'd either).

// regionPoolSize is how many spares a pool keeps.
const regionPoolSize = 2

// regionPoolDir holds the spares of block size bs (0: cow's default).
func regionPoolDir(manifestRoot string, bs int) string {
	if bs == 0 {
		bs = cow.DefaultBlockSize
	}
	return filepath.Join(filepath.Dir(filepath.Clean(manifestRoot)), "rootfs-regions", fmt.Sprintf("bs%d", bs))
}

// takeSpareRegion moves a spare into cfg's region dir if that does not
// exist yet; false if there was none (the region is then created as usual).
func takeSpareRegion(cfg Config) bool {
	dst := cfg.regionDir()
	if dst == "" {
		return false
	}
	if _, err := os.Lstat(dst); !errors.Is(err, os.ErrNotExist) {
		return false
	}
	pool := regionPoolDir(cfg.ManifestRoot, cfg.BlockSize)
	des, err := os.ReadDir(pool)
	if err != nil || len(des) == 0 {
		return false
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o700); err != nil {
		return false
	}
	for _, de := range des {
		if !strings.HasPrefix(de.Name(), "r-") {
			continue
		}
		// Another server may take the same one: rename is the arbiter.
		err := os.Rename(filepath.Join(pool, de.Name()), dst)
		if err == nil {
			return true
		}
		if errors.Is(err, unix.EXDEV) {
			return false
		}
	}
	return false
}

// refillRegionPool tops the pool of cfg's block size up to regionPoolSize.
// One server at a time (flock on the pool dir); others skip.
func refillRegionPool(ctx context.Context, cfg Config) {
	if cfg.regionDir() == "" {
		return
	}
	pool := regionPoolDir(cfg.ManifestRoot, cfg.BlockSize)
	if err := os.MkdirAll(pool, 0o700); err != nil {
		return
	}
	d, err := os.Open(pool)
	if err != nil {
		return
	}
	defer d.Close()
	if unix.Flock(int(d.Fd()), unix.LOCK_EX|unix.LOCK_NB) != nil {
		return // someone else refills
	}
	des, err := os.ReadDir(pool)
	if err != nil {
		return
	}
	have := 0
	for _, de := range des {
		switch {
		case strings.HasPrefix(de.Name(), "r-"):
			have++
		case strings.HasPrefix(de.Name(), ".tmp-"):
			// A refill killed half-way (servers are killed at Remove).
			os.RemoveAll(filepath.Join(pool, de.Name()))
		}
	}
	for ; have < regionPoolSize && ctx.Err() == nil; have++ {
		if err := makeSpareRegion(pool, cfg.BlockSize); err != nil {
			log.G(ctx).WithError(err).Warn("rootfs: spare region")
			return
		}
	}
}

func makeSpareRegion(pool string, bs int) error {
	tmp, err := os.MkdirTemp(pool, ".tmp-")
	if err != nil {
		return err
	}
	// The smallest data file: the server's open preallocates its reserve.
	minBS := bs
	if minBS == 0 {
		minBS = cow.DefaultBlockSize
	}
	reg, err := cow.Open(tmp, cow.Options{BlockSize: bs, Reserve: int64(minBS)})
	if err == nil {
		err = reg.Close()
	}
	if err == nil {
		err = os.Rename(tmp, filepath.Join(pool, fmt.Sprintf("r-%d-%d", os.Getpid(), time.Now().UnixNano())))
	}
	if err != nil {
		os.RemoveAll(tmp)
		return err
	}
	return nil
}
