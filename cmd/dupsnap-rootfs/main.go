// Command dupsnap-rootfs serves one container root filesystem: the same
// server as `dupsnap rootfs`, in a small binary of its own. One of these
// runs per container; the big dupsnap binary's code pages (containerd,
// grpc, ...) would otherwise count against every one of them.
// rootfs.Start prefers it when it sits next to the dupsnap binary.
//
// Usage: dupsnap-rootfs rootfs --config FILE [--log-level L]
//
//	dupsnap-rootfs rootfs --spare [--for CASROOT] [--log-level L]  (started ahead by the daemon)
//
// (the "rootfs" word keeps the command line the same as dupsnap's, which is
// how pkg/rootfs recognises its servers by pid).
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/sirupsen/logrus"

	"github.com/dupsnap/dupsnap/pkg/rootfs"
)

func main() {
	args := os.Args[1:]
	if len(args) > 0 && args[0] == "rootfs" {
		args = args[1:]
	}
	fl := flag.NewFlagSet("dupsnap-rootfs", flag.ExitOnError)
	config := fl.String("config", "", "rootfs config file (JSON, required unless --spare)")
	spare := fl.Bool("spare", false, "start as a spare: wait for the config path (and log file) on the pipe named by $"+rootfs.AssignFDEnv+" (rootfs.StartSpare)")
	logLevel := fl.String("log-level", "info", "log level: trace, debug, info, warn, error")
	fl.String("for", "", "informational, spares only: the store the spare will serve (shows whose process it is in ps)")
	fl.Parse(args)
	var pre *rootfs.Preloaded
	if *spare {
		pre = rootfs.Preload() // the chain $DUPSNAP_ROOTFS_PRELOAD expects, while we wait
		cfg, ok, err := rootfs.AwaitAssignment()
		if err != nil {
			fmt.Fprintln(os.Stderr, "dupsnap-rootfs:", err)
			os.Exit(1)
		}
		if !ok {
			return // the daemon went away before it needed us
		}
		*config = cfg
	}
	if err := run(*config, *logLevel, pre); err != nil {
		fmt.Fprintln(os.Stderr, "dupsnap-rootfs:", err)
		os.Exit(1)
	}
}

func run(config, logLevel string, pre *rootfs.Preloaded) error {
	if config == "" {
		return fmt.Errorf("--config is required")
	}
	l, err := logrus.ParseLevel(logLevel)
	if err != nil {
		return fmt.Errorf("bad --log-level %q: %w", logLevel, err)
	}
	logrus.SetLevel(l)
	logrus.SetFormatter(&logrus.TextFormatter{FullTimestamp: true})
	cfg, err := rootfs.LoadConfig(config)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	return rootfs.ServePreloaded(ctx, cfg, pre)
}
