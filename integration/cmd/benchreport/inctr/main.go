// Command inctr runs inside a benchmark container (static binary, copied
// into the bench image) and prints one JSON object of timings, so that
// what is measured is the filesystem, not container start-up.
//
//	inctr reads BIG DIR        warm pass, then timed: sequential read of BIG and of all files under DIR, random 4 KiB reads of BIG, lstat walk of DIR
//	inctr overwrite BIG        one 4 KiB write in the middle of BIG (open for write included: that is where overlayfs copies up)
//	inctr randwrite BIG N      N random 4 KiB writes over BIG (copy-up included), then sequential and random reads of the partly modified file
//	inctr create DIR N MB      N files of 4 KiB and one file of MB MiB under DIR
//	inctr sleep SECONDS | true
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"time"
)

const block = 4096

func main() {
	if len(os.Args) < 2 {
		fail(fmt.Errorf("usage: inctr reads|overwrite|randwrite|create|sleep|true ..."))
	}
	res := map[string]float64{}
	var err error
	switch os.Args[1] {
	case "true":
		return
	case "sleep":
		s, _ := strconv.ParseFloat(arg(2), 64)
		time.Sleep(time.Duration(s * float64(time.Second)))
		return
	case "reads":
		err = reads(arg(2), arg(3), res)
	case "overwrite":
		err = overwrite(arg(2), res)
	case "randwrite":
		n, _ := strconv.Atoi(arg(3))
		err = randwrite(arg(2), n, res)
	case "create":
		n, _ := strconv.Atoi(arg(3))
		mb, _ := strconv.Atoi(arg(4))
		err = create(arg(2), n, mb, res)
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fail(err)
	}
	json.NewEncoder(os.Stdout).Encode(res)
}

func arg(i int) string {
	if i < len(os.Args) {
		return os.Args[i]
	}
	return ""
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "inctr:", err)
	os.Exit(1)
}

func mbps(n int64, d time.Duration) float64 { return float64(n) / 1e6 / d.Seconds() }

func readFile(p string, buf []byte) (int64, error) {
	f, err := os.Open(p)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	// Plain read(2) calls of len(buf): io.Copy to io.Discard would read in
	// 8 KiB pieces whatever buffer it is given.
	var n int64
	for {
		m, err := f.Read(buf)
		n += int64(m)
		if err == io.EOF {
			return n, nil
		}
		if err != nil {
			return n, err
		}
	}
}

func walkFiles(dir string) ([]string, int, error) {
	var files []string
	n := 0
	err := filepath.WalkDir(dir, func(p string, de fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if _, err := os.Lstat(p); err != nil {
			return err
		}
		n++
		if de.Type().IsRegular() {
			files = append(files, p)
		}
		return nil
	})
	return files, n, err
}

func randReads(f *os.File, size int64, n int, seed uint64) (time.Duration, error) {
	r := rand.New(rand.NewPCG(seed, 1))
	buf := make([]byte, block)
	blocks := size / block
	t0 := time.Now()
	for i := 0; i < n; i++ {
		if _, err := f.ReadAt(buf, r.Int64N(blocks)*block); err != nil {
			return 0, err
		}
	}
	return time.Since(t0), nil
}

func reads(big, dir string, res map[string]float64) error {
	buf := make([]byte, 1<<20)
	// Warm pass: everything measured below is read from the page cache on
	// both snapshotters, so the numbers compare the filesystems, not the disk.
	files, _, err := walkFiles(dir)
	if err != nil {
		return err
	}
	for _, p := range files {
		if _, err := readFile(p, buf); err != nil {
			return err
		}
	}
	if _, err := readFile(big, buf); err != nil {
		return err
	}
	t0 := time.Now()
	_, count, err := walkFiles(dir)
	if err != nil {
		return err
	}
	res["stat_s"] = time.Since(t0).Seconds()
	res["stat_files"] = float64(count)
	t0 = time.Now()
	var total int64
	for _, p := range files {
		n, err := readFile(p, buf)
		if err != nil {
			return err
		}
		total += n
	}
	res["seq_files_mbps"] = mbps(total, time.Since(t0))
	res["seq_files_bytes"] = float64(total)
	t0 = time.Now()
	n, err := readFile(big, buf)
	if err != nil {
		return err
	}
	res["seq_big_mbps"] = mbps(n, time.Since(t0))
	f, err := os.Open(big)
	if err != nil {
		return err
	}
	defer f.Close()
	const ops = 20000
	d, err := randReads(f, n, ops, 7)
	if err != nil {
		return err
	}
	res["rand_big_mbps"] = mbps(ops*block, d)
	return nil
}

func overwrite(big string, res map[string]float64) error {
	st, err := os.Stat(big)
	if err != nil {
		return err
	}
	buf := make([]byte, block)
	for i := range buf {
		buf[i] = 0xA5
	}
	t0 := time.Now()
	f, err := os.OpenFile(big, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	if _, err := f.WriteAt(buf, (st.Size()/2)&^(block-1)); err != nil {
		return err
	}
	res["first_write_s"] = time.Since(t0).Seconds()
	return f.Close()
}

func randwrite(big string, n int, res map[string]float64) error {
	st, err := os.Stat(big)
	if err != nil {
		return err
	}
	r := rand.New(rand.NewPCG(11, 3))
	buf := make([]byte, block)
	for i := range buf {
		buf[i] = byte(i)
	}
	blocks := st.Size() / block
	t0 := time.Now()
	f, err := os.OpenFile(big, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	for i := 0; i < n; i++ {
		if _, err := f.WriteAt(buf, r.Int64N(blocks)*block); err != nil {
			return err
		}
	}
	res["randwrite_s"] = time.Since(t0).Seconds()
	res["randwrite_iops"] = float64(n) / time.Since(t0).Seconds()
	rb := make([]byte, 1<<20)
	if _, err := readFile(big, rb); err != nil { // warm
		return err
	}
	t0 = time.Now()
	m, err := readFile(big, rb)
	if err != nil {
		return err
	}
	res["mod_seq_mbps"] = mbps(m, time.Since(t0))
	const ops = 20000
	d, err := randReads(f, st.Size(), ops, 9)
	if err != nil {
		return err
	}
	res["mod_rand_mbps"] = mbps(ops*block, d)
	return nil
}

func create(dir string, n, mb int, res map[string]float64) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	small := make([]byte, block)
	t0 := time.Now()
	for i := 0; i < n; i++ {
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("f%05d", i)), small, 0o644); err != nil {
			return err
		}
	}
	res["small_files_per_s"] = float64(n) / time.Since(t0).Seconds()
	chunk := make([]byte, 1<<20)
	for i := range chunk {
		chunk[i] = byte(i * 7)
	}
	t1 := time.Now()
	f, err := os.Create(filepath.Join(dir, "large"))
	if err != nil {
		return err
	}
	for i := 0; i < mb; i++ {
		if _, err := f.Write(chunk); err != nil {
			return err
		}
	}
	if err := f.Close(); err != nil {
		return err
	}
	res["large_mbps"] = mbps(int64(mb)<<20, time.Since(t1))
	res["create_s"] = time.Since(t0).Seconds()
	return nil
}
