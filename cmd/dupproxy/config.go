package main

import (
	"flag"

	"github.com/dupsnap/dupsnap/internal/cli"
	"github.com/dupsnap/dupsnap/proxy"
)

// storeFlags are the flags every subcommand that opens the store shares;
// flags given on the command line override the config file.
type storeFlags struct {
	config, listen, root, upstream, cacheDir, cacheSize, metrics, logLevel string
}

func (f *storeFlags) register(fs *flag.FlagSet, serving bool) {
	fs.StringVar(&f.config, "config", "", "TOML config file (see docs/dupproxy.md)")
	fs.StringVar(&f.root, "root", "", "store directory (default /var/lib/dupproxy)")
	fs.StringVar(&f.upstream, "upstream", "", "default upstream registry URL, e.g. https://registry-1.docker.io")
	fs.StringVar(&f.cacheDir, "cache-dir", "", "restore cache directory (default <root>/cache)")
	fs.StringVar(&f.cacheSize, "cache-size", "", "restore cache bound, e.g. 10GiB (default 10GiB)")
	fs.StringVar(&f.logLevel, "log-level", "info", "log level: trace, debug, info, warn, error")
	if serving {
		fs.StringVar(&f.listen, "listen", "", "address of the registry and dedup API (default :5000)")
		fs.StringVar(&f.metrics, "metrics-address", "", "address of the Prometheus /metrics endpoint (default off)")
	}
}

// loadOffline is load for the commands that work on the store alone
// (stats, gc, fsck): they need no upstream, so a config without one is fine.
func (f *storeFlags) loadOffline() (proxy.Config, error) {
	c, err := f.load()
	if err == nil && c.Upstream == "" && len(c.Upstreams) == 0 {
		c.Upstream = "http://unused.invalid"
	}
	return c, err
}

func (f *storeFlags) load() (proxy.Config, error) {
	if err := cli.SetupLogging(f.logLevel); err != nil {
		return proxy.Config{}, err
	}
	var c proxy.Config
	if f.config != "" {
		var err error
		if c, err = proxy.LoadConfig(f.config); err != nil {
			return c, err
		}
	}
	set := func(dst *string, v string) {
		if v != "" {
			*dst = v
		}
	}
	set(&c.Listen, f.listen)
	set(&c.Root, f.root)
	set(&c.Upstream, f.upstream)
	set(&c.CacheDir, f.cacheDir)
	set(&c.MetricsAddress, f.metrics)
	if f.cacheSize != "" {
		n, err := proxy.ParseSize(f.cacheSize)
		if err != nil {
			return c, cli.Usagef("--cache-size: %v", err)
		}
		c.CacheSize = proxy.Size(n)
	}
	return c, nil
}
