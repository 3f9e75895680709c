package harness

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Containerd is a private containerd (own root, state, sockets under one
// dir) with dupsnap as proxy snapshotter and overlayfs also available.
type Containerd struct {
	Dir        string
	Address    string
	Namespace  string
	RuncRoot   string
	ConfigFile string
	LogFile    string
	Proc       *Proc
	tools      string
}

// ContainerdOptions configure StartContainerd.
type ContainerdOptions struct {
	// DupsnapSocket and DupsnapRoot wire proxy_plugins.dupsnap (omit both to
	// run without dupsnap).
	DupsnapSocket, DupsnapRoot string
	// Namespace for ctr commands (default "dupsnap-test").
	Namespace string
	// MaxConcurrentUnpacks is the transfer service's max_concurrent_unpacks:
	// 0 means DefaultConcurrentUnpacks (parallel unpack, the documented
	// setup: no parent at Prepare, the parent given at Commit via rebase,
	// for dupsnap and overlayfs alike); 1 is the sequential unpack.
	MaxConcurrentUnpacks int
	// Extra TOML appended to the generated config.
	Extra string
}

// DefaultConcurrentUnpacks is the harness's (and docs/containerd.md's)
// max_concurrent_unpacks.
const DefaultConcurrentUnpacks = 3

func (o ContainerdOptions) unpacks() int {
	if o.MaxConcurrentUnpacks <= 0 {
		return DefaultConcurrentUnpacks
	}
	return o.MaxConcurrentUnpacks
}

// Config renders the containerd config for dir.
func (o ContainerdOptions) Config(dir string) string {
	var b strings.Builder
	fmt.Fprintf(&b, `version = 3
root = %q
state = %q
disabled_plugins = [
  "io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime",
  "io.containerd.nri.v1.nri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.blockfile",
  "io.containerd.snapshotter.v1.erofs", "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing", "io.containerd.podsandbox.controller.v1.podsandbox",
  "io.containerd.sandbox.controller.v1.shim",
]
[grpc]
  address = %q
[ttrpc]
  address = %q
[debug]
  address = ""
  level = "debug"
[plugins."io.containerd.internal.v1.opt"]
  path = %q
[plugins."io.containerd.transfer.v1.local"]
  max_concurrent_unpacks = %d
  [[plugins."io.containerd.transfer.v1.local".unpack_config]]
    platform = "linux/amd64"
    snapshotter = "overlayfs"
`, filepath.Join(dir, "root"), filepath.Join(dir, "state"), filepath.Join(dir, "containerd.sock"),
		filepath.Join(dir, "containerd.sock.ttrpc"), filepath.Join(dir, "opt"), o.unpacks())
	if o.DupsnapSocket != "" {
		fmt.Fprintf(&b, `  [[plugins."io.containerd.transfer.v1.local".unpack_config]]
    platform = "linux/amd64"
    snapshotter = "dupsnap"
[proxy_plugins.dupsnap]
  type = "snapshot"
  address = %q
  capabilities = ["rebase"]
  [proxy_plugins.dupsnap.exports]
    root = %q
    enable_remote_snapshot_annotations = "true"
`, o.DupsnapSocket, o.DupsnapRoot)
	}
	b.WriteString(o.Extra)
	return b.String()
}

// StartContainerd starts containerd under dir and waits until ctr can talk
// to it. Containers and shims are torn down in t.Cleanup.
func StartContainerd(ctx context.Context, t testing.TB, dir string, o ContainerdOptions) *Containerd {
	t.Helper()
	tools := ToolsDir()
	Require(t, filepath.Join(tools, "containerd"), filepath.Join(tools, "ctr"), filepath.Join(tools, "containerd-shim-runc-v2"))
	if _, err := os.Stat("/usr/sbin/runc"); err != nil {
		t.Skip("runc missing (apt-get install runc)")
	}
	if o.Namespace == "" {
		o.Namespace = "dupsnap-test"
	}
	c := &Containerd{
		Dir:        dir,
		Address:    filepath.Join(dir, "containerd.sock"),
		Namespace:  o.Namespace,
		RuncRoot:   filepath.Join(dir, "runc"),
		ConfigFile: filepath.Join(dir, "containerd.toml"),
		LogFile:    filepath.Join(dir, "containerd.log"),
		tools:      tools,
	}
	if err := os.WriteFile(c.ConfigFile, []byte(o.Config(dir)), 0o644); err != nil {
		t.Fatal(err)
	}
	env := []string{"PATH=" + tools + ":/usr/sbin:/usr/bin:/sbin:/bin"}
	c.Proc = StartProc(t, "containerd", c.LogFile, env, filepath.Join(tools, "containerd"), "--config", c.ConfigFile)
	t.Cleanup(func() { c.teardown() })
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for {
		if c.Proc.Exited() {
			t.Fatalf("containerd exited\n%s", c.Proc.Tail())
		}
		if conn, err := net.Dial("unix", c.Address); err == nil {
			conn.Close()
			if _, err := c.Ctr(wctx, 10*time.Second, "version"); err == nil {
				return c
			}
		}
		select {
		case <-wctx.Done():
			t.Fatalf("containerd not ready: %v\n%s", wctx.Err(), c.Proc.Tail())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Ctr runs ctr against this containerd in its namespace, with a deadline.
func (c *Containerd) Ctr(ctx context.Context, timeout time.Duration, args ...string) (string, error) {
	full := append([]string{"--address", c.Address, "--namespace", c.Namespace}, args...)
	return Run(ctx, timeout, []string{"PATH=" + c.tools + ":/usr/sbin:/usr/bin:/sbin:/bin"}, filepath.Join(c.tools, "ctr"), full...)
}

// RunArgs are the ctr run flags that keep runc's state private to this dir.
func (c *Containerd) RunArgs() []string {
	return []string{"--runc-root", c.RuncRoot, "--runc-binary", "/usr/sbin/runc"}
}

// teardown kills containers left by a failed test (runc delete --force),
// then containerd; shims and mounts go with the test dir's cleanup.
func (c *Containerd) teardown() {
	if des, err := os.ReadDir(c.RuncRoot); err == nil {
		for _, ns := range des {
			root := filepath.Join(c.RuncRoot, ns.Name())
			ids, _ := os.ReadDir(root)
			for _, id := range ids {
				_, _ = Run(context.Background(), 15*time.Second, nil, "/usr/sbin/runc", "--root", root, "delete", "--force", id.Name())
			}
		}
	}
	c.Proc.Kill()
	KillMentioning(c.Address)
}
