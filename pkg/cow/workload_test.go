package cow

import (
	"bytes"
	"math/rand/v2"
	"path/filepath"
	"testing"
)

// TestCrashWorkloadClean runs the crash workload without crashing and
// checks the region against the model live and after a clean reopen.
func TestCrashWorkloadClean(t *testing.T) {
	for seed := range uint64(4) {
		dir := t.TempDir()
		r, err := Open(filepath.Join(dir, "region"), crashOpts)
		if err != nil {
			t.Fatal(err)
		}
		rng := rand.New(rand.NewPCG(seed, 1))
		m := &crashModel{files: map[uint64][]byte{}, bases: map[uint64][]byte{}}
		for i := range 1000 {
			op := genCrashOp(rng, m, i)
			if err := m.applyRegion(r, op); err != nil {
				t.Fatalf("seed %d op %d %+v: %v", seed, i, op, err)
			}
			m.apply(op)
			if f, err := r.File(op.id); err == nil {
				got := readAll(t, f, baseData(op.id))
				if want := m.files[op.id]; !bytes.Equal(got, want) {
					t.Fatalf("seed %d op %d %+v: content differs at %d (size %d want %d)", seed, i, op, firstDiff(got, want), len(got), len(want))
				}
			}
		}
		checkInvariants(t, r)
		if err := r.Close(); err != nil {
			t.Fatal(err)
		}
		if r, err = Open(filepath.Join(dir, "region"), crashOpts); err != nil {
			t.Fatal(err)
		}
		checkCrashState(t, r, []*crashModel{m})
		r.Close()
	}
}

// abandon simulates a process crash between operations: drop the region
// without syncing anything (what the process wrote stays in the page cache,
// as after SIGKILL).
func abandon(r *Region) {
	r.mu.Lock()
	r.closed = true
	r.mu.Unlock()
	r.data.Close()
	r.j.close()
}

// TestCrashSimulated crashes in-process between ops at deterministic
// points, so a failure is reproducible from its seed.
func TestCrashSimulated(t *testing.T) {
	for seed := range uint64(20) {
		dir := t.TempDir()
		r, err := Open(filepath.Join(dir, "region"), crashOpts)
		if err != nil {
			t.Fatal(err)
		}
		rng := rand.New(rand.NewPCG(seed, 1))
		m := &crashModel{files: map[uint64][]byte{}, bases: map[uint64][]byte{}}
		stop := 30 + int(seed*37%500)
		var states []*crashModel
		states = append(states, m.clone())
		for i := range stop {
			op := genCrashOp(rng, m, i)
			if err := m.applyRegion(r, op); err != nil {
				t.Fatalf("seed %d op %d %+v: %v", seed, i, op, err)
			}
			m.apply(op)
			if op.kind == cSync {
				states = states[:0]
			}
			states = append(states, m.clone())
		}
		abandon(r)
		if r, err = Open(filepath.Join(dir, "region"), crashOpts); err != nil {
			t.Fatal(err)
		}
		checkInvariants(t, r)
		t.Logf("seed %d: crash after %d ops, %d candidate states", seed, stop, len(states))
		checkCrashState(t, r, states)
		r.Close()
	}
}
