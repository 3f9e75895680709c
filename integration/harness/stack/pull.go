package stack

import (
	"context"
	"fmt"
	"strings"
	"time"
)

// PullStep is one image pulled, with the node's totals after it.
type PullStep struct {
	Image       string        `json:"image"`
	Time        time.Duration `json:"time_ns"`
	Wire        int64         `json:"wire_bytes"`
	SnapDisk    int64         `json:"snapshot_disk_bytes"` // cumulative, after this pull
	ContentDisk int64         `json:"content_disk_bytes"`  // cumulative
}

// PullResult is a whole image set pulled with one snapshotter.
type PullResult struct {
	Snapshotter string        `json:"snapshotter"`
	Steps       []PullStep    `json:"steps"`
	Time        time.Duration `json:"time_ns"`
	Wire        int64         `json:"wire_bytes"`
	SnapDisk    int64         `json:"snapshot_disk_bytes"`
	ContentDisk int64         `json:"content_disk_bytes"`
	Err         string        `json:"error,omitempty"`
}

// Disk is snapshots plus content store.
func (p PullResult) Disk() int64 { return p.SnapDisk + p.ContentDisk }

// wire is what the node received from the registry tier so far.
func (n *Node) wire() int64 {
	w := n.rt.RegFwd.Down()
	if n.rt.ProxyFwd != nil {
		w += n.rt.ProxyFwd.Down()
	}
	return w
}

// PullAll pulls imgs one by one with snapshotter, recording time, wire
// bytes and disk after each; it stops at the first failure (Err).
func (n *Node) PullAll(ctx context.Context, snapshotter string, imgs []*Image, progress func(string, ...any)) PullResult {
	r := PullResult{Snapshotter: snapshotter}
	for _, im := range imgs {
		w0 := n.wire()
		d, err := n.Pull(ctx, snapshotter, im)
		if err != nil {
			r.Err = fmt.Sprintf("pull %s: %s", im.Repo, firstLine(err.Error()))
			return r
		}
		cd, err := n.ContentDisk(ctx, NS(snapshotter))
		if err != nil {
			r.Err = err.Error()
			return r
		}
		st := PullStep{Image: im.Short(), Time: d, Wire: n.wire() - w0, SnapDisk: n.SnapshotDisk(snapshotter), ContentDisk: cd}
		r.Steps = append(r.Steps, st)
		r.Time += d
		r.Wire += st.Wire
		r.SnapDisk, r.ContentDisk = st.SnapDisk, st.ContentDisk
		if progress != nil {
			progress("  %-9s %-6s pulled in %6.2fs, %10s over the wire, node disk now %s",
				snapshotter, im.Short(), d.Seconds(), MiB(st.Wire), MiB(st.SnapDisk+st.ContentDisk))
		}
	}
	return r
}

// RunCheck runs a container of im that verifies some of its files against
// the checksums recorded when the image was built.
func (n *Node) RunCheck(ctx context.Context, snapshotter string, im *Image, id string) (time.Duration, error) {
	t0 := time.Now()
	out, err := n.Run(ctx, snapshotter, im, id, 2*time.Minute, "/bin/sh", "-c",
		"sha256sum -c --quiet "+im.Sums+" && cat /demo/name")
	d := time.Since(t0)
	if err != nil {
		return d, err
	}
	if !strings.Contains(out, im.Short()) {
		return d, fmt.Errorf("container of %s printed %q, want its name", im.Repo, out)
	}
	return d, nil
}
