package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/log"
	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"

	"github.com/dupsnap/dupsnap/internal/cli"
	"github.com/dupsnap/dupsnap/snapshotter"
	"github.com/dupsnap/dupsnap/snapshotter/offload"
)

var serveFlags struct {
	config, root, address, logLevel, metrics string
	proxy                                    string
}

func init() {
	app.Register(&cli.Command{
		Name:  "serve",
		Usage: "serve [--config FILE] [--root DIR] [--address SOCKET] [--log-level L] [--metrics-address ADDR]",
		Short: "run the containerd snapshotter daemon (proxy plugin, gRPC on a unix socket)",
		Long: `Serves containerd's snapshots API on a unix socket (mode 0600) so that
containerd can use dupsnap as a proxy snapshotter ([proxy_plugins.dupsnap],
see docs/containerd.md). Image layers become manifests over one node-wide
file store under --root; container root filesystems are FUSE mounts served
by separate "dupsnap rootfs" processes that keep running when this daemon
stops, is killed or upgraded; on start it re-adopts them.

Options come from the TOML config (default /etc/dupsnap/config.toml, every
option documented in docs/config.toml); flags given here override it.
Tells systemd when ready (Type=notify) and stops on SIGINT/SIGTERM. Under
socket activation (docs/dupsnap.socket) it serves the socket systemd passes
in, which then outlives restarts: containerd's calls wait for the new daemon
instead of failing.`,
		Flags: func(fs *flag.FlagSet) {
			fs.StringVar(&serveFlags.config, "config", "", "TOML config file (default "+defaultConfigPath+" if it exists)")
			fs.StringVar(&serveFlags.root, "root", "", "state directory: CAS, manifests, metadata, snapshots (default "+defaultRoot+")")
			fs.StringVar(&serveFlags.address, "address", "", "unix socket to serve on (default "+defaultAddress+")")
			fs.StringVar(&serveFlags.logLevel, "log-level", "", "trace, debug, info, warn or error (default info)")
			fs.StringVar(&serveFlags.metrics, "metrics-address", "", "serve Prometheus metrics on this TCP address (e.g. 127.0.0.1:9411); off if empty")
			fs.StringVar(&serveFlags.proxy, "proxy", "", "default dupproxy URL for dedup offloading ([offload] default; docs/offload.md)")
		},
		Run: runServe,
	})
}

func runServe(ctx context.Context, args []string) error {
	if len(args) > 0 {
		return cli.Usagef("unexpected arguments %q", args)
	}
	path, explicit := defaultConfigPath, false
	if serveFlags.config != "" {
		path, explicit = serveFlags.config, true
	}
	cfg, err := loadServeConfig(path, explicit)
	if err != nil {
		return err
	}
	override(&cfg.Root, serveFlags.root)
	override(&cfg.Address, serveFlags.address)
	override(&cfg.LogLevel, serveFlags.logLevel)
	override(&cfg.MetricsAddress, serveFlags.metrics)
	override(&cfg.Offload.Default, serveFlags.proxy)
	if err := cli.SetupLogging(cfg.LogLevel); err != nil {
		return err
	}

	fetcher, err := offload.New(ctx, cfg.Offload.config())
	if err != nil {
		return err
	}
	scfg := snapshotter.Config{
		Root:         cfg.Root,
		RootfsBinary: cfg.Rootfs.Binary,
		RootfsDebug:  cfg.Rootfs.Debug,
		GCGrace:      time.Duration(cfg.GC.Grace),
		NoSync:       cfg.CAS.NoSync,
		NoLowerView:  !cfg.Unpack.LowerView,

		RegionReserve:      cfg.Rootfs.RegionReserve,
		RegionBlockSize:    cfg.Rootfs.RegionBlockSize,
		DefaultMaxSize:     cfg.Rootfs.DefaultMaxSize,
		PassthroughMinSize: cfg.Rootfs.PassthroughMinSize,
		ReflinkCopyUp:      cfg.Rootfs.ReflinkCopyUp,
	}
	if fetcher != nil {
		defer fetcher.Close()
		scfg.Fetcher = fetcher
	}
	sn, err := snapshotter.New(ctx, scfg)
	if err != nil {
		return err
	}
	defer sn.Close()

	l, activated, err := listen(ctx, cfg.Address)
	if err != nil {
		return err
	}
	if activated {
		// The socket is systemd's: it stays (and queues containerd's calls)
		// while this daemon restarts.
		cfg.Address = l.Addr().String()
	}
	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))

	var msrv *http.Server
	if cfg.MetricsAddress != "" {
		reg := prometheus.NewRegistry()
		reg.MustRegister(snapshotter.NewCollector(sn)...)
		reg.MustRegister(offload.Collectors()...)
		reg.MustRegister(prometheus.NewGoCollector(), prometheus.NewProcessCollector(prometheus.ProcessCollectorOpts{}))
		ml, err := net.Listen("tcp", cfg.MetricsAddress)
		if err != nil {
			l.Close()
			return fmt.Errorf("metrics listener: %w", err)
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
		msrv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		go msrv.Serve(ml)
		log.G(ctx).WithField("address", ml.Addr().String()).Info("serving metrics")
	}

	errCh := make(chan error, 1)
	go func() { errCh <- srv.Serve(l) }()
	log.G(ctx).WithField("address", cfg.Address).WithField("root", sn.Root()).Info("dupsnap snapshotter serving")
	if _, err := daemon.SdNotify(false, daemon.SdNotifyReady); err != nil {
		log.G(ctx).WithError(err).Warn("sd_notify")
	}

	select {
	case err = <-errCh:
	case <-ctx.Done():
		log.G(ctx).Info("stopping (rootfs servers keep running)")
		daemon.SdNotify(false, daemon.SdNotifyStopping)
		stopped := make(chan struct{})
		go func() { srv.GracefulStop(); close(stopped) }()
		select {
		case <-stopped:
		case <-time.After(10 * time.Second):
			srv.Stop()
		}
	}
	if msrv != nil {
		msrv.Close()
	}
	if !activated {
		os.Remove(cfg.Address)
	}
	if errors.Is(err, grpc.ErrServerStopped) {
		err = nil
	}
	return err
}

func override(dst *string, v string) {
	if v != "" {
		*dst = v
	}
}
