package cow

import (
	"bytes"
	"math/rand/v2"
	"sync"
	"testing"
)

// Compactions run while writers go on (only the state copy excludes
// them): with a tiny journal limit nearly every Sync checkpoints while
// four writers create, write, truncate and remove files; after Close and
// reopen every file holds exactly what was written last, so no record
// made during a checkpoint was lost or applied twice.
func TestCheckpointWhileWriting(t *testing.T) {
	dir := t.TempDir()
	opts := Options{BlockSize: 512, Reserve: 64 << 10, GrowStep: 64 << 10, JournalLimit: 2 << 10, PunchThreshold: 4096}
	r, err := Open(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	want := map[uint64][]byte{} // final content per surviving file
	var mu sync.Mutex
	var wg sync.WaitGroup
	stop := make(chan struct{})
	syncs, ckpts := 0, 0
	done := make(chan struct{})
	go func() { // the sync tick, as fast as it goes
		defer close(done)
		for {
			select {
			case <-stop:
				return
			default:
			}
			before := r.j.ckptSize
			if err := r.Sync(); err != nil {
				t.Error(err)
				return
			}
			syncs++
			if r.j.seq == 1 || r.j.ckptSize != before {
				ckpts++
			}
		}
	}()
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 5))
			for i := range 200 {
				id := uint64(w*1000 + i)
				f, err := r.Create(id)
				if err != nil {
					t.Error(err)
					return
				}
				var content []byte
				for range rng.IntN(6) + 1 {
					off := rng.Int64N(8 << 10)
					buf := bytes.Repeat([]byte{byte(rng.IntN(250) + 1)}, rng.IntN(3000)+1)
					if _, err := f.WriteAt(buf, off, nil); err != nil {
						t.Error(err)
						return
					}
					if end := off + int64(len(buf)); end > int64(len(content)) {
						content = append(content, make([]byte, end-int64(len(content)))...)
					}
					copy(content[off:], buf)
				}
				if rng.IntN(4) == 0 {
					n := rng.Int64N(int64(len(content)) + 1)
					if err := f.Truncate(n); err != nil {
						t.Error(err)
						return
					}
					content = content[:n]
				}
				if rng.IntN(3) == 0 {
					if err := r.Remove(id); err != nil {
						t.Error(err)
						return
					}
					continue
				}
				mu.Lock()
				want[id] = content
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	close(stop)
	<-done
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	r, err = Open(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if got := len(r.Files()); got != len(want) {
		t.Fatalf("%d files after reopen, want %d", got, len(want))
	}
	for id, content := range want {
		f, err := r.File(id)
		if err != nil {
			t.Fatalf("file %d: %v", id, err)
		}
		got := make([]byte, f.Size())
		if f.Size() != int64(len(content)) {
			t.Fatalf("file %d: size %d, want %d", id, f.Size(), len(content))
		}
		if _, err := f.ReadAt(got, 0, nil); err != nil && len(got) > 0 {
			t.Fatal(err)
		}
		if !bytes.Equal(got, content) {
			t.Fatalf("file %d: content differs after reopen", id)
		}
	}
	checkInvariants(t, r)
	t.Logf("%d files, %d syncs during the writes, %d of them checkpointed", len(want), syncs, ckpts)
	if ckpts == 0 {
		t.Error("no checkpoint ran during the writes")
	}
}
