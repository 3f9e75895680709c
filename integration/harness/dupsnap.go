package harness

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// Dupsnap is a `dupsnap serve` subprocess with its own root and socket.
type Dupsnap struct {
	Root    string
	Socket  string
	Config  string
	LogFile string
	Bin     string
	Args    []string // extra serve flags
	Proc    *Proc
	t       testing.TB
}

// StartDupsnap starts `dupsnap serve` under dir (root dir/root, socket
// dir/dupsnap.sock) and waits until it answers. config is the TOML text of
// the config file (may be empty).
func StartDupsnap(ctx context.Context, t testing.TB, dir, config string, args ...string) *Dupsnap {
	t.Helper()
	Require(t, DupsnapBin())
	d := &Dupsnap{
		Root:    filepath.Join(dir, "root"),
		Socket:  filepath.Join(dir, "dupsnap.sock"),
		Config:  filepath.Join(dir, "dupsnap.toml"),
		LogFile: filepath.Join(dir, "dupsnap.log"),
		Bin:     DupsnapBin(),
		Args:    args,
		t:       t,
	}
	if err := os.WriteFile(d.Config, []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := d.Start(ctx); err != nil {
		t.Fatal(err)
	}
	// Processes go before the dir's mounts: registered after TempDir's cleanup.
	t.Cleanup(func() { d.Proc.Kill() })
	return d
}

// Start (re)starts the daemon and waits for its socket to serve.
func (d *Dupsnap) Start(ctx context.Context) error {
	args := append([]string{"serve", "--config", d.Config, "--root", d.Root, "--address", d.Socket, "--log-level", "debug"}, d.Args...)
	p, err := startProc("dupsnap", d.LogFile, nil, d.Bin, args...)
	if err != nil {
		return err
	}
	d.Proc = p
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	for {
		if p.Exited() {
			return fmt.Errorf("dupsnap serve exited: %v\n%s", p.err, p.Tail())
		}
		if c, err := net.Dial("unix", d.Socket); err == nil {
			c.Close()
			sn, closeFn, err := d.Client()
			if err == nil {
				err = sn.Walk(ctx, func(context.Context, snapshots.Info) error { return nil })
				closeFn()
				if err == nil {
					return nil
				}
			}
		}
		select {
		case <-ctx.Done():
			p.Kill()
			return fmt.Errorf("dupsnap serve not ready: %w\n%s", ctx.Err(), p.Tail())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Kill9 kills the daemon with SIGKILL (rootfs servers keep running).
func (d *Dupsnap) Kill9() { d.Proc.Kill() }

// Restart kills (SIGKILL) and starts the daemon again on the same root.
func (d *Dupsnap) Restart(ctx context.Context) error {
	d.Proc.Kill()
	return d.Start(ctx)
}

// Client dials the daemon's socket with containerd's own gRPC proxy client,
// exactly as containerd talks to a proxy snapshotter.
func (d *Dupsnap) Client() (snapshots.Snapshotter, func() error, error) {
	return DialSnapshotter(d.Socket)
}

// DialSnapshotter connects containerd's proxy snapshotter client to socket.
func DialSnapshotter(socket string) (snapshots.Snapshotter, func() error, error) {
	conn, err := grpc.NewClient("unix://"+socket,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(16<<20)))
	if err != nil {
		return nil, nil, err
	}
	return proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "dupsnap"), conn.Close, nil
}

// Tail is the end of the daemon log.
func (d *Dupsnap) Tail() string { return LogTail(d.LogFile, 60) }
