package main

import (
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/pelletier/go-toml/v2"

	"github.com/dupsnap/dupsnap/snapshotter/offload"
)

// serveConfig is the TOML config of `dupsnap serve` (docs/config.toml
// documents every option). Flags given on the command line win.
type serveConfig struct {
	Root           string `toml:"root"`
	Address        string `toml:"address"`
	LogLevel       string `toml:"log_level"`
	MetricsAddress string `toml:"metrics_address"`
	Rootfs         struct {
		Binary          string `toml:"binary"`
		Debug           bool   `toml:"debug"`
		RegionReserve   int64  `toml:"region_reserve"`
		RegionBlockSize int    `toml:"region_block_size"`
		DefaultMaxSize  int64  `toml:"default_max_size"`
		// PassthroughMinSize: nil (unset) means the pkg/rootfs default.
		PassthroughMinSize *int64 `toml:"passthrough_min_size"`
		ReflinkCopyUp      bool   `toml:"reflink_copy_up"`
	} `toml:"rootfs"`
	Unpack struct {
		LowerView bool `toml:"lower_view"`
	} `toml:"unpack"`
	GC struct {
		Grace duration `toml:"grace"`
	} `toml:"gc"`
	CAS struct {
		NoSync bool `toml:"no_sync"`
	} `toml:"cas"`
	Offload offloadConfig `toml:"offload"`
}

// offloadConfig is [offload]: dedup offloading through dupproxy
// (docs/offload.md). Off unless an endpoint source is set.
type offloadConfig struct {
	Default        string                      `toml:"default"`
	Endpoints      map[string]offload.Endpoint `toml:"endpoints"`
	HostsDir       string                      `toml:"hosts_dir"`
	Timeout        duration                    `toml:"timeout"`
	ConnectTimeout duration                    `toml:"connect_timeout"`
	Parallel       int                         `toml:"parallel"`
	BatchSize      int                         `toml:"batch_size"`
	Containerd     struct {
		Address   string `toml:"address"`
		Namespace string `toml:"namespace"`
	} `toml:"containerd"`
}

func (c offloadConfig) config() offload.Config {
	return offload.Config{
		Default:             c.Default,
		Endpoints:           c.Endpoints,
		HostsDir:            c.HostsDir,
		Timeout:             time.Duration(c.Timeout),
		ConnectTimeout:      time.Duration(c.ConnectTimeout),
		Parallel:            c.Parallel,
		BatchSize:           c.BatchSize,
		ContainerdAddress:   c.Containerd.Address,
		ContainerdNamespace: c.Containerd.Namespace,
	}
}

const (
	defaultConfigPath = "/etc/dupsnap/config.toml"
	defaultRoot       = "/var/lib/dupsnap"
	defaultAddress    = "/run/dupsnap/dupsnap.sock"
)

func defaultServeConfig() serveConfig {
	var c serveConfig
	c.Root = defaultRoot
	c.Address = defaultAddress
	c.LogLevel = "info"
	c.Unpack.LowerView = true
	c.GC.Grace = duration(10 * time.Minute)
	return c
}

// loadServeConfig reads path over the defaults. A missing file is fine only
// for the default path (no config is a valid setup); unknown keys are errors
// so that typos do not silently fall back to defaults.
func loadServeConfig(path string, explicit bool) (serveConfig, error) {
	c := defaultServeConfig()
	f, err := os.Open(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) && !explicit {
			return c, nil
		}
		return c, fmt.Errorf("config: %w", err)
	}
	defer f.Close()
	dec := toml.NewDecoder(f).DisallowUnknownFields()
	if err := dec.Decode(&c); err != nil {
		return c, fmt.Errorf("config %s: %w", path, err)
	}
	return c, nil
}

// duration is a time.Duration written as "10m" in TOML.
type duration time.Duration

func (d *duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return err
	}
	*d = duration(v)
	return nil
}

func (d duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }
