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
	// listener, when set, is the socket the harness holds for the daemon,
	// as systemd's dupsnap.socket does (socket activation).
	listener *net.UnixListener
}

// StartDupsnap starts `dupsnap serve` under dir (root dir/root, socket
// dir/dupsnap.sock) and waits until it answers. config is the TOML text of
// the config file (may be empty).
func StartDupsnap(ctx context.Context, t testing.TB, dir, config string, args ...string) *Dupsnap {
	t.Helper()
	d := newDupsnap(t, dir, config, args)
	return d.startOrFail(ctx)
}

// StartDupsnapActivated is StartDupsnap under socket activation: the
// harness makes the listening socket once, as systemd's dupsnap.socket
// would, and hands it to every start of the daemon (LISTEN_FDS), so it
// outlives a killed daemon.
func StartDupsnapActivated(ctx context.Context, t testing.TB, dir, config string, args ...string) *Dupsnap {
	t.Helper()
	d := newDupsnap(t, dir, config, args)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: d.Socket, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(true)
	t.Cleanup(func() { l.Close() })
	d.listener = l
	return d.startOrFail(ctx)
}

func newDupsnap(t testing.TB, dir, config string, args []string) *Dupsnap {
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
	return d
}

func (d *Dupsnap) startOrFail(ctx context.Context) *Dupsnap {
	d.t.Helper()
	if err := d.Start(ctx); err != nil {
		d.t.Fatal(err)
	}
	// Processes go before the dir's mounts: registered after TempDir's cleanup.
	d.t.Cleanup(func() { d.Proc.Kill() })
	return d
}

// Start (re)starts the daemon and waits for its socket to serve.
func (d *Dupsnap) Start(ctx context.Context) error {
	args := append([]string{"serve", "--config", d.Config, "--root", d.Root, "--address", d.Socket, "--log-level", "debug"}, d.Args...)
	var p *Proc
	var err error
	if d.listener != nil {
		p, err = d.startActivated(args)
	} else {
		p, err = startProc("dupsnap", d.LogFile, nil, d.Bin, args...)
	}
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

// startActivated passes the held socket as fd 3 with LISTEN_FDS=1; a shell
// sets LISTEN_PID to its own pid and execs the daemon, which keeps it
// (sd_listen_fds ignores fds meant for another process).
func (d *Dupsnap) startActivated(args []string) (*Proc, error) {
	f, err := d.listener.File() // a dup: the harness keeps its own
	if err != nil {
		return nil, err
	}
	defer f.Close()
	sh := append([]string{"-c", `LISTEN_PID=$$ exec "$0" "$@"`, d.Bin}, args...)
	return startProcFiles("dupsnap", d.LogFile, []string{"LISTEN_FDS=1", "LISTEN_FDNAMES=dupsnap.sock"}, []*os.File{f}, "/bin/sh", sh...)
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
