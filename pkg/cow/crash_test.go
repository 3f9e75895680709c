package cow

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The crash test re-executes the test binary as a child that runs a seeded
// random workload on a region, logging after every op ("d i") and after
// every Sync returned ("s i"). The parent kills it with SIGKILL at a random
// moment, regenerates the same op sequence, and checks the reopened region:
// every file and every block must be as in the last synced state or some
// later state, never anything else (in particular not another file's data).

var crashOpts = Options{BlockSize: 512, Reserve: 32 << 10, GrowStep: 32 << 10, FileReserve: 2048,
	PunchThreshold: 4096, JournalLimit: 8 << 10, MaxPending: 48}

const (
	cCreate = iota
	cCreateBase
	cWrite
	cTruncate
	cZero
	cRemove
	cSync
)

type crashOp struct {
	kind    int
	id      uint64
	off, n  int64
	idx     int
	present bool
}

// crashModel is the expected content of every file.
type crashModel struct {
	files map[uint64][]byte
	bases map[uint64][]byte
}

func (m *crashModel) clone() *crashModel {
	c := &crashModel{files: map[uint64][]byte{}, bases: maps.Clone(m.bases)}
	for id, b := range m.files {
		c.files[id] = bytes.Clone(b)
	}
	return c
}

// opData is unique, never-zero content for op idx.
func opData(idx int, n int64) []byte {
	rng := rand.New(rand.NewPCG(uint64(idx), 77))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.Uint32()) | 1
	}
	return b
}

// baseData is the base stream of a file id: every incarnation's base is a
// prefix of it, so the checker can read any incarnation with the full one.
func baseData(id uint64) []byte { return opData(-int(id), 24<<10) }

func genCrashOp(rng *rand.Rand, m *crashModel, idx int) crashOp {
	id := uint64(rng.IntN(6) + 1)
	cur, ok := m.files[id]
	op := crashOp{id: id, idx: idx}
	k := rng.IntN(100)
	switch {
	case !ok:
		op.kind = cCreate
		if k < 60 {
			op.kind, op.n = cCreateBase, rng.Int64N(24<<10)
		}
	case k < 55:
		op.kind = cWrite
		op.off = rng.Int64N(int64(len(cur)) + 1024)
		op.n = rng.Int64N(3000) + 1
	case k < 68 || len(cur) > 48<<10:
		op.kind, op.n = cTruncate, rng.Int64N(int64(len(cur))*5/4+1)
	case k < 73:
		op.kind, op.off, op.n = cZero, rng.Int64N(int64(len(cur))+1), rng.Int64N(3000)+1
	case k < 78:
		op.kind = cRemove
	default:
		op.kind = cSync
	}
	return op
}

func (m *crashModel) apply(op crashOp) {
	cur := m.files[op.id]
	switch op.kind {
	case cCreate:
		m.files[op.id] = []byte{}
		delete(m.bases, op.id)
	case cCreateBase:
		b := baseData(op.id)[:op.n]
		m.bases[op.id] = b
		m.files[op.id] = bytes.Clone(b)
	case cWrite:
		if end := op.off + op.n; end > int64(len(cur)) {
			cur = append(cur, make([]byte, end-int64(len(cur)))...)
		}
		copy(cur[op.off:], opData(op.idx, op.n))
		m.files[op.id] = cur
	case cTruncate:
		if op.n <= int64(len(cur)) {
			m.files[op.id] = cur[:op.n]
		} else {
			m.files[op.id] = append(cur, make([]byte, op.n-int64(len(cur)))...)
		}
	case cZero:
		end := min(op.off+op.n, int64(len(cur)))
		for i := op.off; i < end; i++ {
			cur[i] = 0
		}
	case cRemove:
		delete(m.files, op.id)
	}
}

func (m *crashModel) applyRegion(r *Region, op crashOp) error {
	base := bytesReaderOrNil(m.bases[op.id])
	switch op.kind {
	case cCreate, cCreateBase:
		f, err := r.Create(op.id)
		if err == nil && op.kind == cCreateBase {
			err = f.SetBase(op.n)
		}
		return err
	case cRemove:
		return r.Remove(op.id)
	case cSync:
		return r.Sync()
	}
	f, err := r.File(op.id)
	if err != nil {
		return err
	}
	switch op.kind {
	case cWrite:
		_, err = f.WriteAt(opData(op.idx, op.n), op.off, base)
	case cTruncate:
		err = f.Truncate(op.n)
	case cZero:
		err = f.Fallocate(unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, op.off, op.n, base)
	}
	return err
}

func bytesReaderOrNil(b []byte) *bytes.Reader {
	return bytes.NewReader(b)
}

// TestCrashChild is the workload process; it only runs when re-executed.
func TestCrashChild(t *testing.T) {
	dir := os.Getenv("COW_CRASH_DIR")
	if dir == "" {
		t.Skip("crash child: only runs under TestCrash")
	}
	seed, _ := strconv.ParseUint(os.Getenv("COW_CRASH_SEED"), 10, 64)
	r, err := Open(filepath.Join(dir, "region"), crashOpts)
	if err != nil {
		t.Fatal(err)
	}
	prog, err := os.OpenFile(filepath.Join(dir, "progress"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(seed, 1))
	m := &crashModel{files: map[uint64][]byte{}, bases: map[uint64][]byte{}}
	deadline := time.Now().Add(20 * time.Second) // never outlive a dead parent for long
	for i := 0; time.Now().Before(deadline); i++ {
		op := genCrashOp(rng, m, i)
		if err := m.applyRegion(r, op); err != nil {
			fmt.Fprintf(prog, "e %d %v\n", i, err)
			t.Fatalf("op %d %+v: %v", i, op, err)
		}
		m.apply(op)
		tag := "d"
		if op.kind == cSync {
			tag = "s"
		}
		// One write(2) per op: the page cache survives SIGKILL.
		if _, err := fmt.Fprintf(prog, "%s %d\n", tag, i); err != nil {
			t.Fatal(err)
		}
	}
}

func TestCrash(t *testing.T) {
	if testing.Short() {
		t.Skip("crash test: skipped in -short")
	}
	rounds := 8
	start := time.Now()
	for round := range rounds {
		if time.Since(start) > 15*time.Second {
			t.Logf("stopping after %d rounds (time budget)", round)
			break
		}
		seed := uint64(time.Now().UnixNano())
		t.Run(fmt.Sprintf("seed%d", seed), func(t *testing.T) { crashRound(t, seed, round) })
	}
}

func crashRound(t *testing.T, seed uint64, round int) {
	dir := t.TempDir()
	log, err := os.Create(filepath.Join(dir, "child.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer log.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestCrashChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), "COW_CRASH_DIR="+dir, "COW_CRASH_SEED="+strconv.FormatUint(seed, 10))
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	// Wait for the workload to start, then kill it at a random moment.
	progPath := filepath.Join(dir, "progress")
	for wait := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if st, err := os.Stat(progPath); err == nil && st.Size() > 0 {
			break
		}
		if time.Now().After(wait) {
			b, _ := os.ReadFile(filepath.Join(dir, "child.log"))
			t.Fatalf("child did not start: %s", b)
		}
	}
	time.Sleep(time.Duration(30+rand.IntN(250)+round*20) * time.Millisecond)
	cmd.Process.Kill()
	cmd.Wait()

	lastSync, lastDone := -1, -1
	pf, err := os.Open(progPath)
	if err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(pf)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 2 {
			continue // a torn last line
		}
		i, err := strconv.Atoi(f[1])
		if err != nil {
			continue
		}
		switch f[0] {
		case "s":
			lastSync, lastDone = i, i
		case "d":
			lastDone = i
		case "e":
			b, _ := os.ReadFile(filepath.Join(dir, "child.log"))
			t.Fatalf("child failed: %s", b)
		}
	}
	pf.Close()

	// Regenerate the states the region may legally show: after the last
	// synced op, and after each later op up to the one in flight.
	rng := rand.New(rand.NewPCG(seed, 1))
	m := &crashModel{files: map[uint64][]byte{}, bases: map[uint64][]byte{}}
	var states []*crashModel
	if lastSync < 0 {
		states = append(states, m.clone())
	}
	for i := 0; i <= lastDone+1; i++ {
		m.apply(genCrashOp(rng, m, i))
		if i >= lastSync {
			states = append(states, m.clone())
		}
	}
	crashOpsForDebug = nil
	{
		rng := rand.New(rand.NewPCG(seed, 1))
		m := &crashModel{files: map[uint64][]byte{}, bases: map[uint64][]byte{}}
		for i := 0; i <= lastDone+1; i++ {
			op := genCrashOp(rng, m, i)
			m.apply(op)
			crashOpsForDebug = append(crashOpsForDebug, op)
		}
	}
	t.Logf("ops done %d, last sync %d, %d candidate states", lastDone+1, lastSync, len(states))

	for reopen := range 2 {
		r, err := Open(filepath.Join(dir, "region"), crashOpts)
		if err != nil {
			t.Fatalf("reopen %d: %v", reopen, err)
		}
		checkInvariants(t, r)
		checkCrashState(t, r, states)
		if err := r.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

func checkCrashState(t *testing.T, r *Region, states []*crashModel) {
	t.Helper()
	ids := map[uint64]bool{}
	for _, s := range states {
		for id := range s.files {
			ids[id] = true
		}
	}
	for _, id := range r.Files() {
		ids[id] = true
	}
	bs := int64(r.BlockSize())
	for id := range ids {
		f, err := r.File(id)
		if err != nil {
			for _, s := range states {
				if _, ok := s.files[id]; !ok {
					goto next // absent in some legal state
				}
			}
			t.Fatalf("file %d missing, but present in every legal state", id)
		}
		{
			var cands []*crashModel
			sizeOK := false
			for _, s := range states {
				if c, ok := s.files[id]; ok {
					cands = append(cands, s)
					sizeOK = sizeOK || int64(len(c)) == f.Size()
				}
			}
			if len(cands) == 0 {
				t.Fatalf("file %d exists but in no legal state", id)
			}
			if !sizeOK {
				t.Fatalf("file %d has size %d, in no legal state", id, f.Size())
			}
			got := readAll(t, f, baseData(id))
			// Compare the bytes inside the recovered size: an in-place write
			// to the last block may survive while the size change it made
			// is lost, as on a local filesystem.
			for off := int64(0); off < int64(len(got)); off += bs {
				blk := got[off:min(off+bs, int64(len(got)))]
				ok := false
				for _, s := range cands {
					if bytes.Equal(blk, padBlock(s.files[id], off, bs)[:len(blk)]) {
						ok = true
						break
					}
				}
				if !ok {
					for _, s := range cands {
						t.Logf("candidate: size %d block %x", len(s.files[id]), padBlock(s.files[id], off, bs)[:16])
					}
					t.Logf("ops: %s", explainBlock(blk, crashOpsForDebug))
					t.Fatalf("file %d block at %d matches no legal state (first bytes %x)", id, off, blk[:min(16, len(blk))])
				}
			}
		}
	next:
	}
}

func padBlock(b []byte, off, bs int64) []byte {
	out := make([]byte, bs)
	if off < int64(len(b)) {
		copy(out, b[off:min(off+bs, int64(len(b)))])
	}
	return out
}

var crashOpsForDebug []crashOp

// explainBlock names the ops whose data appears in blk (debugging aid).
func explainBlock(blk []byte, ops []crashOp) string {
	var out []string
	for i := 0; i+8 <= len(blk); i += 64 {
		probe := blk[i : i+8]
		if bytes.Equal(probe, make([]byte, 8)) {
			out = append(out, fmt.Sprintf("@%d zero", i))
			continue
		}
		for _, op := range ops {
			if op.kind == cWrite {
				if j := bytes.Index(opData(op.idx, op.n), probe); j >= 0 {
					out = append(out, fmt.Sprintf("@%d op%d(file %d off %d n %d +%d)", i, op.idx, op.id, op.off, op.n, j))
				}
			}
		}
		for id := uint64(1); id <= 6; id++ {
			if j := bytes.Index(baseData(id), probe); j >= 0 {
				out = append(out, fmt.Sprintf("@%d base%d+%d", i, id, j))
			}
		}
	}
	return strings.Join(out, " ")
}
