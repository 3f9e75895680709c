package cas

import (
	"bytes"
	"testing"
)

// TestStreamDuplicateDiscarded: a streamed put whose content the batch (or
// the store) already has is written, then discarded; its fd is closed off
// the writer's path, and by the time Commit or Abort returns every such fd
// is closed and no temp is left.
func TestStreamDuplicateDiscarded(t *testing.T) {
	for _, m := range tempModes {
		t.Run(m.name, func(t *testing.T) {
			s := openStore(t, Options{})
			m.set(s)
			ctx := testCtx(t)
			data := randBytes(7, 3*chunkSize+11)
			b := s.NewBatch()
			for i := 0; i < 3; i++ {
				d, n, err := b.Put(ctx, bytes.NewReader(data))
				if err != nil || d != dgst(data) || n != int64(len(data)) {
					t.Fatalf("put %d: %s %d %v", i, d, n, err)
				}
			}
			if err := b.Commit(ctx); err != nil {
				t.Fatal(err)
			}
			if n := s.anonOpen.Load(); n != 0 {
				t.Fatalf("%d O_TMPFILE descriptors still open after Commit", n)
			}
			if names := tmpNames(t, s); len(names) != 0 {
				t.Fatalf("temps left after Commit: %v", names)
			}
			if !bytes.Equal(readAll(t, s, dgst(data)), data) {
				t.Fatal("object content differs")
			}

			// Content already stored is streamed, found present, discarded:
			// Abort waits for that close too.
			b = s.NewBatch()
			if _, _, err := b.Put(ctx, bytes.NewReader(data)); err != nil {
				t.Fatal(err)
			}
			b.Abort()
			if n := s.anonOpen.Load(); n != 0 {
				t.Fatalf("%d O_TMPFILE descriptors still open after Abort", n)
			}
			if names := tmpNames(t, s); len(names) != 0 {
				t.Fatalf("temps left after Abort: %v", names)
			}
			if !s.Has(dgst(data)) {
				t.Fatal("Abort of a duplicate put removed the object")
			}
		})
	}
}
