package cas

import (
	"bytes"
	"context"
	"io"
	"testing"

	"github.com/opencontainers/go-digest"
)

// TestDirectStreams: streamed objects of a durable store go through
// O_DIRECT (aligned chunks) and the page cache (the unaligned tail), in a
// batch and in a single Put, and every object reads back exactly.
func TestDirectStreams(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, Options{DirectWrites: true})
	sizes := []int{chunkSize + 1, 2 * chunkSize, 3*chunkSize + directAlign - 1, 5*chunkSize + directAlign, 2*chunkSize + 100}
	want := map[digest.Digest][]byte{}
	b := s.NewBatch()
	for i, n := range sizes[:4] {
		data := randBytes(uint64(100+i), n)
		d, got, err := b.Put(ctx, bytes.NewReader(data))
		if err != nil || got != int64(n) {
			t.Fatalf("put %d bytes: %v (%d)", n, err, got)
		}
		want[d] = data
	}
	if err := b.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	data := randBytes(200, sizes[4])
	d, _, err := s.Put(ctx, bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	want[d] = data
	if s.noDirect.Load() {
		t.Logf("O_DIRECT unsupported under %s: buffered path only", s.Root())
	} else if s.directWrites.Load() == 0 {
		t.Fatal("no O_DIRECT write on a durable store")
	}
	for d, data := range want {
		rc, err := s.Open(d)
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(rc)
		rc.Close()
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("%s: read back %d bytes (%v), want %d", d, len(got), err, len(data))
		}
	}
	rep, err := s.Fsck(ctx, false)
	if err != nil || len(rep.Corrupt) != 0 || rep.Objects != len(want) {
		t.Fatalf("fsck: %+v %v", rep, err)
	}

	// A no_sync store never uses O_DIRECT (its point is the page cache).
	ns := openStore(t, Options{NoSync: true})
	if _, _, err := ns.Put(ctx, bytes.NewReader(randBytes(300, 3*chunkSize))); err != nil {
		t.Fatal(err)
	}
	if ns.directWrites.Load() != 0 {
		t.Fatal("O_DIRECT write in a no_sync store")
	}
}
