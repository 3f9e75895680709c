package cow

import (
	"bytes"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
)

// Benchmarks (run briefly, e.g. `go test -run XXX -bench . -benchtime 3x
// ./pkg/cow`). The plain-file variants are the overlayfs-like baselines on
// the same filesystem.

const baseSize = 256 << 20

// makeBase writes a 256 MiB file of non-zero data (the image file's CAS
// object) and returns it open read-only.
func makeBase(b *testing.B, dir string) *os.File {
	b.Helper()
	path := filepath.Join(dir, "base")
	f, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	chunk := bytes.Repeat([]byte("0123456789abcdef"), 1<<16)
	for off := 0; off < baseSize; off += len(chunk) {
		if _, err := f.Write(chunk); err != nil {
			b.Fatal(err)
		}
	}
	f.Close()
	ro, err := os.Open(path)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ro.Close() })
	return ro
}

// 4 KiB overwrite in the middle of a 256 MiB image file, durable: region
// CoW (one block) vs copy-up (whole-file copy, as overlayfs does).
func BenchmarkOverwrite4KCoW(b *testing.B) {
	dir := b.TempDir()
	base := makeBase(b, dir)
	r, err := Open(filepath.Join(dir, "region"), Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer r.Close()
	buf := bytes.Repeat([]byte{0xaa}, 4096)
	id := uint64(0)
	used0 := r.Usage()
	b.ResetTimer()
	for b.Loop() {
		id++
		f, err := r.Create(id)
		if err != nil {
			b.Fatal(err)
		}
		f.SetBase(baseSize)
		if _, err := f.WriteAt(buf, baseSize/2+100, base); err != nil {
			b.Fatal(err)
		}
		if err := f.Sync(); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(r.Usage()-used0)/float64(id), "region-bytes/op")
}

func BenchmarkOverwrite4KCopyUp(b *testing.B) {
	dir := b.TempDir()
	base := makeBase(b, dir)
	buf := bytes.Repeat([]byte{0xaa}, 4096)
	i := 0
	for b.Loop() {
		i++
		up, err := os.Create(filepath.Join(dir, fmt.Sprint("up", i)))
		if err != nil {
			b.Fatal(err)
		}
		base.Seek(0, io.SeekStart)
		if _, err := io.Copy(up, base); err != nil { // copy_file_range, like copy-up
			b.Fatal(err)
		}
		if _, err := up.WriteAt(buf, baseSize/2+100); err != nil {
			b.Fatal(err)
		}
		if err := up.Sync(); err != nil {
			b.Fatal(err)
		}
		up.Close()
		b.StopTimer()
		os.Remove(up.Name())
		b.StartTimer()
	}
	b.ReportMetric(baseSize, "region-bytes/op")
}

// Random 4 KiB writes over a 256 MiB image file (first writes CoW blocks;
// no fsync) vs pwrite into an already copied-up plain file.
func BenchmarkRandom4KCoW(b *testing.B) {
	dir := b.TempDir()
	base := makeBase(b, dir)
	r, err := Open(filepath.Join(dir, "region"), Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer r.Close()
	f, _ := r.Create(1)
	f.SetBase(baseSize)
	buf := bytes.Repeat([]byte{0xaa}, 4096)
	rng := rand.New(rand.NewPCG(1, 1))
	b.SetBytes(4096)
	for b.Loop() {
		if _, err := f.WriteAt(buf, rng.Int64N(baseSize/4096)*4096, base); err != nil {
			b.Fatal(err)
		}
	}
	st := r.Stats()
	b.ReportMetric(st.AvgExtentBytes, "avg-extent-bytes")
}

func BenchmarkRandom4KPlain(b *testing.B) {
	dir := b.TempDir()
	base := makeBase(b, dir)
	base.Close()
	f, err := os.OpenFile(filepath.Join(dir, "base"), os.O_RDWR, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	buf := bytes.Repeat([]byte{0xaa}, 4096)
	rng := rand.New(rand.NewPCG(1, 1))
	b.SetBytes(4096)
	for b.Loop() {
		if _, err := f.WriteAt(buf, rng.Int64N(baseSize/4096)*4096); err != nil {
			b.Fatal(err)
		}
	}
}

// Sequential write (+fsync) and warm read of a new 64 MiB file in 128 KiB
// requests (FUSE's default max write), region extents vs a plain file.
const seqSize = 64 << 20

func BenchmarkSeqWriteNewRegion(b *testing.B) {
	r, err := Open(b.TempDir(), Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer r.Close()
	buf := bytes.Repeat([]byte{0x55}, 128<<10)
	b.SetBytes(seqSize)
	id := uint64(0)
	for b.Loop() {
		id++
		f, _ := r.Create(id)
		for off := int64(0); off < seqSize; off += int64(len(buf)) {
			if _, err := f.WriteAt(buf, off, nil); err != nil {
				b.Fatal(err)
			}
		}
		if err := f.Sync(); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		r.Remove(id)
		r.Sync()
		b.StartTimer()
	}
}

func BenchmarkSeqWriteNewPlain(b *testing.B) {
	dir := b.TempDir()
	buf := bytes.Repeat([]byte{0x55}, 128<<10)
	b.SetBytes(seqSize)
	for b.Loop() {
		f, err := os.Create(filepath.Join(dir, "f"))
		if err != nil {
			b.Fatal(err)
		}
		for off := int64(0); off < seqSize; off += int64(len(buf)) {
			if _, err := f.WriteAt(buf, off); err != nil {
				b.Fatal(err)
			}
		}
		if err := f.Sync(); err != nil {
			b.Fatal(err)
		}
		f.Close()
		b.StopTimer()
		os.Remove(f.Name())
		b.StartTimer()
	}
}

func BenchmarkSeqReadNewRegion(b *testing.B) {
	r, err := Open(b.TempDir(), Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer r.Close()
	buf := bytes.Repeat([]byte{0x55}, 128<<10)
	f, _ := r.Create(1)
	for off := int64(0); off < seqSize; off += int64(len(buf)) {
		f.WriteAt(buf, off, nil)
	}
	b.SetBytes(seqSize)
	for b.Loop() {
		for off := int64(0); off < seqSize; off += int64(len(buf)) {
			if _, err := f.ReadAt(buf, off, nil); err != nil {
				b.Fatal(err)
			}
		}
	}
}

func BenchmarkSeqReadNewPlain(b *testing.B) {
	f, err := os.Create(filepath.Join(b.TempDir(), "f"))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	buf := bytes.Repeat([]byte{0x55}, 128<<10)
	for off := int64(0); off < seqSize; off += int64(len(buf)) {
		f.WriteAt(buf, off)
	}
	b.SetBytes(seqSize)
	for b.Loop() {
		for off := int64(0); off < seqSize; off += int64(len(buf)) {
			if _, err := f.ReadAt(buf, off); err != nil {
				b.Fatal(err)
			}
		}
	}
}
