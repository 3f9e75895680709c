package s3store_test

import (
	"context"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/dupsnap/dupsnap/proxy/s3store"
	"github.com/dupsnap/dupsnap/proxy/s3store/s3test"
)

// The operations dupproxy relies on, against a real SeaweedFS: create-only
// puts, touch (copy onto itself) keeping the content, listing.
func TestBucket(t *testing.T) {
	srv := s3test.Start(t)
	b, err := s3store.Open(srv.Bucket(t, "bucket-test"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	body := strings.Repeat("content ", 1000)
	put := func(createOnly bool) error {
		return b.Put(ctx, "k/obj", strings.NewReader(body), int64(len(body)), map[string]string{"dupsnap-size": "8000"}, createOnly)
	}
	if err := put(true); err != nil {
		t.Fatal(err)
	}
	if err := put(true); err != s3store.ErrExists {
		t.Fatalf("second create-only put: %v, want ErrExists", err)
	}
	i0, err := b.Head(ctx, "k/obj")
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(1100 * time.Millisecond)
	if err := b.Touch(ctx, "k/obj", i0.Meta); err != nil {
		t.Fatal(err)
	}
	i1, err := b.Head(ctx, "k/obj")
	if err != nil {
		t.Fatal(err)
	}
	if !i1.ModTime.After(i0.ModTime) || i1.Size != int64(len(body)) || i1.Meta["dupsnap-size"] != "8000" {
		t.Fatalf("after touch: %+v, before %+v", i1, i0)
	}
	for i := 0; i < 3; i++ {
		rc, _, err := b.Get(ctx, "k/obj")
		if err != nil {
			t.Fatalf("get after touch: %v", err)
		}
		got, err := io.ReadAll(rc)
		rc.Close()
		if err != nil || string(got) != body {
			t.Fatalf("content after touch: %d bytes, %v", len(got), err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	n := 0
	if err := b.List(ctx, "k/", func(s3store.Info) error { n++; return nil }); err != nil || n != 1 {
		t.Fatalf("list: %d, %v", n, err)
	}
}
