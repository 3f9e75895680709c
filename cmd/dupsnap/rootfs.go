package main

import (
	"context"
	"flag"

	"github.com/dupsnap/dupsnap/internal/cli"
	"github.com/dupsnap/dupsnap/pkg/rootfs"
)

func init() {
	var config, logLevel string
	app.Register(&cli.Command{
		Name:  "rootfs",
		Usage: "rootfs --config FILE [--log-level L]",
		Short: "serve one container root filesystem (FUSE) in the foreground",
		Long: `Mounts the root filesystem described by a JSON config file and serves it
until the filesystem is unmounted or the process gets SIGINT/SIGTERM (then it
unmounts). The snapshotter daemon starts one such process per active snapshot
or view (pkg/rootfs.Start) detached from itself, so containers keep their
rootfs when the daemon dies or is upgraded.

The config (written by the daemon next to the mountpoint as rootfs.json):
  mountpoint     absolute path of an existing empty dir to mount on
  cas_root       node CAS root (file contents)
  manifest_root  layer manifest store
  layers         layer diffIDs, bottom first (may be empty)
  state_dir      writable state of an active snapshot (upper/ and work/);
                 "" for a read-only view
  read_only      every write fails with EROFS
  debug          log every FUSE request

Image files are served by FUSE passthrough to their CAS objects; writes go to
state_dir/upper in overlay format (whiteouts, opaque dirs).`,
		Flags: func(fs *flag.FlagSet) {
			fs.StringVar(&config, "config", "", "rootfs config file (JSON, required)")
			fs.StringVar(&logLevel, "log-level", "info", "log level: trace, debug, info, warn, error")
		},
		Run: func(ctx context.Context, args []string) error {
			if config == "" {
				return cli.Usagef("--config is required")
			}
			if err := cli.SetupLogging(logLevel); err != nil {
				return err
			}
			cfg, err := rootfs.LoadConfig(config)
			if err != nil {
				return err
			}
			return rootfs.Serve(ctx, cfg)
		},
	})
}
