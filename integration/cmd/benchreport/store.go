package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/dupsnap/dupsnap/integration/harness"
	"github.com/dupsnap/dupsnap/integration/harness/stack"
	"github.com/dupsnap/dupsnap/pkg/cas"
	"github.com/dupsnap/dupsnap/pkg/layout"
)

// benchStore is issue 2: ingest of an uncompressed layer made of this
// machine's files against sha256 over the same bytes, in the same run, and
// export from a warm store. Stores go under dir (not /tmp).
func benchStore(ctx context.Context, rs *Results, dir string, layerMB, reps int, logf func(string, ...any)) error {
	files, err := stack.PickFiles([]string{"/usr/lib/x86_64-linux-gnu", "/usr/share", "/usr/lib"}, 32<<20, int64(layerMB)<<20)
	if err != nil {
		return err
	}
	l, err := harness.Layer(files)
	if err != nil {
		return err
	}
	rc, err := l.Uncompressed()
	if err != nil {
		return err
	}
	tarb, err := io.ReadAll(rc)
	rc.Close()
	if err != nil {
		return err
	}
	size := float64(len(tarb)) / 1e6
	logf("  layer: %d files, %s uncompressed tar", len(files), stack.MiB(int64(len(tarb))))
	const hashName, ing, ingNS, exp = "sha256 over the same bytes", "ingest MB/s (uncompressed layer, durable CAS)", "ingest MB/s (uncompressed layer, no_sync CAS)", "export MB/s (warm store)"
	const ingDisk = "durable ingest vs this disk's durable write rate"
	// CPU time does not move with the machine's load the way MB/s does, and
	// shows the floor: an ingest hashes every byte twice (the diffID over
	// the tar, each file's own digest), so its CPU is >= 2x the hash's and
	// 0.5x in MB/s needs both cores.
	const ingCPU = "durable ingest CPU time (this process) vs sha256's over the same bytes"
	// Stores are removed only when every repetition is done: on ext4 the
	// inode allocator skips, slowly, inodes freed in the last seconds near
	// the parent directory, so removing one store would slow the next
	// one's creates and the figure would measure our own cleanup (see
	// pkg/cas's benchDir).
	var roots []string
	defer func() {
		for _, r := range roots {
			os.RemoveAll(r)
		}
	}()
	for rep := 0; rep < reps; rep++ {
		cpu0 := cpuTime()
		t0 := time.Now()
		sha256.Sum256(tarb)
		hashRate := size / time.Since(t0).Seconds()
		hashCPU := cpuTime() - cpu0
		diskRate, err := durableWriteRate(dir, tarb)
		if err != nil {
			return err
		}
		for _, nosync := range []bool{false, true} {
			root, err := os.MkdirTemp(dir, "store-")
			if err != nil {
				return err
			}
			roots = append(roots, root)
			c, err := cas.Open(filepath.Join(root, "cas"), cas.Options{NoSync: nosync})
			if err != nil {
				return err
			}
			cpu0 = cpuTime()
			t0 = time.Now()
			b := c.NewBatch()
			m, err := layout.Ingest(ctx, b, bytes.NewReader(tarb), layout.IngestOptions{})
			if err == nil {
				err = b.Commit(ctx)
			}
			d := time.Since(t0)
			ingestCPU := cpuTime() - cpu0
			if err != nil {
				c.Close()
				return fmt.Errorf("ingest: %w", err)
			}
			name := ing
			if nosync {
				name = ingNS
			}
			rs.Add(2, name, "MB/s", hashName, ratioGoal(">=", 0.5), size/d.Seconds(), hashRate)
			if !nosync {
				// Context for the durable figure: this disk's own rate for
				// making the same bytes durable (no goal).
				rs.Add(2, ingDisk, "MB/s", "one file written + fdatasync", func(*Result) {}, size/d.Seconds(), diskRate)
				rs.Add(2, ingCPU, "ms", "sha256 CPU time", func(*Result) {}, ms(ingestCPU), ms(hashCPU))
			}
			if nosync {
				if err := layout.Export(ctx, c, m, io.Discard); err != nil { // warm
					c.Close()
					return fmt.Errorf("export: %w", err)
				}
				t0 = time.Now()
				err = layout.Export(ctx, c, m, io.Discard)
				d = time.Since(t0)
				if err != nil {
					c.Close()
					return fmt.Errorf("export: %w", err)
				}
				rs.Add(2, exp, "MB/s", "", absGoal(">=", 1000, "MB/s"), float64(m.Size)/1e6/d.Seconds(), -1)
			}
			c.Close()
		}
		logf("  rep %d: sha256 %.0f MB/s, durable write %.0f MB/s, ingest %.0f MB/s (durable) / %.0f MB/s (no_sync), export %.0f MB/s", rep+1, hashRate, diskRate,
			last(rs, 2, ing), last(rs, 2, ingNS), last(rs, 2, exp))
	}
	return nil
}

// cpuTime is the user+system CPU time this process has used so far.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func last(rs *Results, issue int, name string) float64 {
	r := rs.byKey[fmt.Sprintf("%d/%s", issue, name)]
	if r == nil || len(r.Samples) == 0 {
		return 0
	}
	return r.Samples[len(r.Samples)-1]
}

// durableWriteRate is MB/s of writing b to one new file under dir and
// fdatasync'ing it: what the disk allows for making those bytes durable.
func durableWriteRate(dir string, b []byte) (float64, error) {
	f, err := os.CreateTemp(dir, "durable-")
	if err != nil {
		return 0, err
	}
	defer os.Remove(f.Name())
	defer f.Close()
	t0 := time.Now()
	if _, err := f.Write(b); err != nil {
		return 0, err
	}
	if err := f.Sync(); err != nil {
		return 0, err
	}
	return float64(len(b)) / 1e6 / time.Since(t0).Seconds(), nil
}
