package stack

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/dupsnap/dupsnap/integration/harness"
)

// Namespaces keep the two snapshotters' images, content and snapshots
// apart in the one containerd (isolated namespaces download their own blobs).
const (
	NSOverlay = "ovl"
	NSDupsnap = "dup"
)

// Node is one machine's worth of container runtime: a private containerd
// with overlayfs and (when it starts) dupsnap as proxy snapshotter.
type Node struct {
	Dir      string
	C        *harness.Containerd
	D        *harness.Dupsnap // nil when dupsnap is not available
	DupErr   string           // why D is nil
	Offload  bool             // dupsnap serve was given --proxy
	HostsDir string           // containerd hosts dir: dupproxy as mirror of the registry
	rt       *RegTier
}

// StartNode starts dupsnap and containerd under dir. With offload, dupsnap
// gets the tier's dupproxy as --proxy (when `dupsnap serve` has the flag)
// and its pulls go through dupproxy as the registry's mirror; without, it
// pulls straight from the registry like overlayfs (ordinary unpack).
func StartNode(ctx context.Context, t *T, dir string, rt *RegTier, offload bool) *Node {
	n := &Node{Dir: dir, rt: rt}
	// Registered first, so it runs last: whatever containerd and dupsnap
	// left (shims, rootfs servers, mounts) goes with the dir.
	t.Cleanup(func() {
		if err := Emergency(dir); err != nil {
			t.Errorf("cleanup of %s: %v", dir, err)
		}
	})
	for _, d := range []string{"dupsnap", "ctrd"} {
		Check(t, os.MkdirAll(filepath.Join(dir, d), 0o755), "node dir")
	}
	var args []string
	if offload && rt.ProxyUp() {
		if help, _ := harness.Run(ctx, 20*time.Second, nil, harness.DupsnapBin(), "serve", "--help"); strings.Contains(help, "-proxy") {
			args = append(args, "--proxy", "http://"+rt.ProxyFwd.Addr)
			n.Offload = true
		}
	}
	if err := Try(t, func() { n.D = harness.StartDupsnap(ctx, t, filepath.Join(dir, "dupsnap"), "", args...) }); err != nil {
		n.DupErr, n.D, n.Offload = firstLine(err.Error()), nil, false
		t.Logf("  dupsnap not available: %s", n.DupErr)
	}
	o := harness.ContainerdOptions{Namespace: NSOverlay}
	if n.D != nil {
		o.DupsnapSocket, o.DupsnapRoot = n.D.Socket, n.D.Root
	}
	n.C = harness.StartContainerd(ctx, t, filepath.Join(dir, "ctrd"), o)
	if offload && rt.ProxyFwd != nil {
		n.HostsDir = filepath.Join(dir, "hosts")
		hd := filepath.Join(n.HostsDir, rt.RegFwd.Addr)
		Check(t, os.MkdirAll(hd, 0o755), "hosts dir")
		toml := fmt.Sprintf("server = %q\n\n[host.%q]\n  capabilities = [\"pull\", \"resolve\"]\n",
			"http://"+rt.RegFwd.Addr, "http://"+rt.ProxyFwd.Addr)
		Check(t, os.WriteFile(filepath.Join(hd, "hosts.toml"), []byte(toml), 0o644), "hosts.toml")
	}
	return n
}

// Ref is the image reference nodes pull (the registry, through its relay).
func (n *Node) Ref(im *Image) string { return n.rt.RegFwd.Addr + "/" + im.Repo }

// NS is the namespace used for a snapshotter.
func NS(snapshotter string) string {
	if snapshotter == "overlayfs" {
		return NSOverlay
	}
	return NSDupsnap
}

// Ctr runs ctr in namespace ns with a deadline.
func (n *Node) Ctr(ctx context.Context, ns string, timeout time.Duration, args ...string) (string, error) {
	full := append([]string{"--address", n.C.Address, "--namespace", ns}, args...)
	return harness.Run(ctx, timeout, []string{"PATH=" + harness.ToolsDir() + ":/usr/sbin:/usr/bin:/sbin:/bin"},
		filepath.Join(harness.ToolsDir(), "ctr"), full...)
}

// Pull pulls im with snapshotter: overlayfs straight from the registry,
// dupsnap with dupproxy as the registry's mirror (hosts.toml).
func (n *Node) Pull(ctx context.Context, snapshotter string, im *Image) (time.Duration, error) {
	args := []string{"image", "pull", "--plain-http", "--snapshotter", snapshotter}
	if snapshotter != "overlayfs" && n.HostsDir != "" {
		args = append(args, "--hosts-dir", n.HostsDir)
	}
	args = append(args, n.Ref(im))
	t0 := time.Now()
	_, err := n.Ctr(ctx, NS(snapshotter), 10*time.Minute, args...)
	return time.Since(t0), err
}

// Run runs a container of im to completion and returns its output.
func (n *Node) Run(ctx context.Context, snapshotter string, im *Image, id string, timeout time.Duration, cmd ...string) (string, error) {
	args := append([]string{"run", "--rm", "--snapshotter", snapshotter}, n.C.RunArgs()...)
	args = append(args, n.Ref(im), id)
	args = append(args, cmd...)
	return n.Ctr(ctx, NS(snapshotter), timeout, args...)
}

// RunKeep runs a container and leaves it (and its snapshot) in place, so
// that what it wrote can be measured; Remove deletes it.
func (n *Node) RunKeep(ctx context.Context, snapshotter string, im *Image, id string, timeout time.Duration, cmd ...string) (string, error) {
	args := append([]string{"run", "--snapshotter", snapshotter}, n.C.RunArgs()...)
	args = append(args, n.Ref(im), id)
	args = append(args, cmd...)
	return n.Ctr(ctx, NS(snapshotter), timeout, args...)
}

// Remove deletes a container kept by RunKeep (and its snapshot).
func (n *Node) Remove(ctx context.Context, snapshotter, id string) error {
	n.Ctr(ctx, NS(snapshotter), 30*time.Second, "task", "rm", "-f", id)
	_, err := n.Ctr(ctx, NS(snapshotter), 60*time.Second, "container", "rm", id)
	return err
}

// SnapshotDisk is the disk used by a snapshotter's own storage: the
// overlayfs snapshots dir, or dupsnap's whole root (CAS, manifests,
// metadata, regions).
func (n *Node) SnapshotDisk(snapshotter string) int64 {
	if snapshotter == "overlayfs" {
		return DiskUsage(filepath.Join(n.C.Dir, "root", "io.containerd.snapshotter.v1.overlayfs"))
	}
	if n.D == nil {
		return 0
	}
	return DiskUsage(n.D.Root)
}

// ContentDisk is the disk of the content-store blobs namespace ns holds.
func (n *Node) ContentDisk(ctx context.Context, ns string) (int64, error) {
	out, err := n.Ctr(ctx, ns, time.Minute, "content", "ls", "-q")
	if err != nil {
		return 0, err
	}
	var total int64
	for _, l := range strings.Fields(out) {
		alg, hex, ok := strings.Cut(l, ":")
		if !ok {
			continue
		}
		var st syscall.Stat_t
		if syscall.Stat(filepath.Join(n.C.Dir, "root", "io.containerd.content.v1.content", "blobs", alg, hex), &st) == nil {
			total += st.Blocks * 512
		}
	}
	return total, nil
}

// RootfsPids are the `dupsnap rootfs` server processes of this node.
func (n *Node) RootfsPids() []int {
	if n.D == nil {
		return nil
	}
	var out []int
	for _, pid := range harness.PidsMentioning(n.D.Root) {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		args := strings.Split(string(b), "\x00")
		if len(args) > 1 && args[1] == "rootfs" {
			out = append(out, pid)
		}
	}
	return out
}

// RSS is a process's resident set in bytes (0 if gone).
func RSS(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "VmRSS:") {
			var kb int64
			fmt.Sscan(strings.TrimSpace(strings.TrimPrefix(l, "VmRSS:")), &kb)
			return kb << 10
		}
	}
	return 0
}
