package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/containerd/log"

	"github.com/dupsnap/dupsnap/internal/cli"
	"github.com/dupsnap/dupsnap/proxy"
)

func init() {
	var f storeFlags
	app.Register(&cli.Command{
		Name:  "serve",
		Usage: "serve [--config FILE] [--listen ADDR] [--root DIR] [--upstream URL] [--cache-dir DIR] [--cache-size N] [--metrics-address ADDR]",
		Short: "run the pull-through proxy (OCI distribution pull API + dedup API)",
		Long: `Serves the OCI distribution pull API in front of one or more upstream
registries. Use it as a containerd mirror (hosts.toml: server = the upstream,
[host."http://PROXY:5000"] capabilities = ["pull", "resolve"]); containerd adds
?ns=<registry host>, which picks an upstream from the [upstreams] table of the
config, else the default --upstream.

Every layer fetched is decomposed into a file store where identical files are
kept once (zstd compressed); blobs are restored byte-identically into the
restore cache (--cache-dir, bounded by --cache-size). Manifests are served
stale, marked with a Warning and X-Dupproxy-Stale header, while the upstream
is unreachable. GC runs every gc_interval. The dedup API for dupsnap is under
/dedup/v1/ (docs/dupproxy.md). Push and delete answer 405 UNSUPPORTED.`,
		Flags: func(fs *flag.FlagSet) { f.register(fs, true) },
		Run: func(ctx context.Context, args []string) error {
			if len(args) > 0 {
				return cli.Usagef("unexpected arguments %v", args)
			}
			cfg, err := f.load()
			if err != nil {
				return err
			}
			return serve(ctx, cfg)
		},
	})
}

func serve(ctx context.Context, cfg proxy.Config) error {
	s, err := proxy.Open(ctx, cfg)
	if err != nil {
		return err
	}
	defer s.Close()
	if err := cfg.Normalize(); err != nil {
		return err
	}
	s.StartGC()
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	srv := &http.Server{Handler: s, ReadHeaderTimeout: 30 * time.Second}
	errc := make(chan error, 2)
	go func() { errc <- srv.Serve(ln) }()
	var msrv *http.Server
	if cfg.MetricsAddress != "" {
		mux := http.NewServeMux()
		mux.Handle("/metrics", s.Metrics())
		msrv = &http.Server{Addr: cfg.MetricsAddress, Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		go func() { errc <- msrv.ListenAndServe() }()
		// Store gauges come from a walk of the store: refresh now and then.
		go func() {
			t := time.NewTicker(5 * time.Minute)
			defer t.Stop()
			for {
				_, _ = s.Stats(ctx)
				select {
				case <-ctx.Done():
					return
				case <-t.C:
				}
			}
		}()
	}
	log.G(ctx).WithField("listen", ln.Addr().String()).WithField("root", cfg.Root).WithField("upstream", cfg.Upstream).Info("dupproxy serving")
	select {
	case <-ctx.Done():
	case err = <-errc:
		if !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("serving: %w", err)
		}
	}
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_ = srv.Shutdown(sctx)
	if msrv != nil {
		_ = msrv.Shutdown(sctx)
	}
	log.G(ctx).Info("dupproxy stopped")
	return nil
}
