package snapshotter

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"

	"github.com/dupsnap/dupsnap/pkg/layout"
	"github.com/dupsnap/dupsnap/pkg/rootfs"
)

// Layers committed one on top of the other (here: already on the node,
// as in a re-pull) get the rootfs tree of the top chain built in the
// background, not those of the chains below it.
func TestWarmTreeAfterCommit(t *testing.T) {
	ctx := context.Background()
	s := newTestSnapshotter(t)
	var diffIDs []digest.Digest
	for _, files := range []map[string]string{{"etc/a": "a"}, {"etc/b": "b"}} {
		m, err := s.Layers().Import(ctx, bytes.NewReader(tarOf(t, files)), layout.IngestOptions{})
		if err != nil {
			t.Fatal(err)
		}
		diffIDs = append(diffIDs, m.DiffID)
	}
	parent := ""
	for i, d := range diffIDs {
		target := "layer" + string(rune('0'+i))
		_, err := s.Prepare(ctx, "extract-"+target, parent, snapshots.WithLabels(map[string]string{
			snapshots.LabelSnapshotRef: target, snapshots.LabelSnapshotDiffID: d.String()}))
		if !errors.Is(err, errdefs.ErrAlreadyExists) {
			t.Fatalf("Prepare of a known layer: %v", err)
		}
		parent = target
	}
	mroot := s.Layers().Dir()
	deadline := time.Now().Add(10 * time.Second)
	for !rootfs.TreeCached(mroot, diffIDs) {
		if time.Now().After(deadline) {
			t.Fatal("tree of the top chain not built")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if rootfs.TreeCached(mroot, diffIDs[:1]) {
		t.Fatal("tree of the lower chain built too (its warm-up was not cancelled)")
	}
}
