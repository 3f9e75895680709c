package proxy

import (
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"time"

	units "github.com/docker/go-units"
	toml "github.com/pelletier/go-toml/v2"

	"github.com/dupsnap/dupsnap/proxy/s3store"
)

// Config is dupproxy's configuration (TOML, see docs/dupproxy.md). Zero
// values mean the documented defaults (applied by Normalize).
type Config struct {
	// Listen is the address of the registry and dedup API (default ":5000").
	Listen string `toml:"listen"`
	// MetricsAddress serves /metrics when set (default: disabled).
	MetricsAddress string `toml:"metrics_address"`
	// Root holds the durable store (default /var/lib/dupproxy).
	Root string `toml:"root"`
	// CacheDir holds restored blobs, disposable (default <root>/cache).
	CacheDir string `toml:"cache_dir"`
	// CacheSize bounds CacheDir ("10GiB"; default 10GiB).
	CacheSize Size `toml:"cache_size"`
	// StoreSize bounds the store: least recently pulled images are evicted
	// by GC above it (0: unbounded).
	StoreSize Size `toml:"store_size"`
	// Upstream is the default upstream registry URL, used when a request
	// carries no ?ns= or one that is not in Upstreams.
	Upstream string `toml:"upstream"`
	// Username/Password for the default upstream.
	Username string `toml:"username"`
	Password string `toml:"password"`
	// AuthPassthrough for the default upstream (see UpstreamConfig).
	AuthPassthrough bool `toml:"auth_passthrough"`
	// Upstreams maps a registry host as sent by containerd in ?ns= to its upstream.
	Upstreams map[string]UpstreamConfig `toml:"upstreams"`
	// ServeStale serves the last known manifest of a tag when the upstream
	// cannot be reached (default true).
	ServeStale *bool `toml:"serve_stale"`
	// TagTTL: a tag resolved less than TagTTL ago is served without asking the
	// upstream (default 0: always revalidate, which is one HEAD).
	TagTTL Duration `toml:"tag_ttl"`
	// Predict restores the uncached layers of an image when its manifest is
	// fetched (default true).
	Predict *bool `toml:"predict"`
	// GCInterval runs GC periodically (default 1h; negative disables).
	GCInterval Duration `toml:"gc_interval"`
	// GCGrace protects objects younger than it from collection (default 1h).
	GCGrace Duration `toml:"gc_grace"`
	// MaxObjectsPerRequest bounds a dedup objects request (default 10000).
	MaxObjectsPerRequest int `toml:"max_objects_per_request"`
	// MaxResponseBytes bounds one dedup objects response; the client re-posts
	// the rest (default 256MiB).
	MaxResponseBytes Size `toml:"max_response_bytes"`
	// NoSync skips fsync in the store (tests only).
	NoSync bool `toml:"no_sync"`
	// Storage selects where the durable state lives (default: under Root).
	Storage StorageConfig `toml:"storage"`
	// Offline: queue no background work at open (fsck must only read).
	Offline bool `toml:"-"`
}

// StorageConfig selects the backend of the durable state.
type StorageConfig struct {
	// Type is "fs" (default: everything under Root) or "s3" (everything in
	// a bucket; Root holds only the lock, the restore cache and scratch).
	Type string         `toml:"type"`
	S3   s3store.Config `toml:"s3"`
	// LeaseTTL: how long an ingest's or GC's lock object in the bucket
	// stays valid without renewal, i.e. how long a killed replica can hold
	// up the others (default 2m).
	LeaseTTL Duration `toml:"lease_ttl"`
}

// UpstreamConfig is one upstream registry.
type UpstreamConfig struct {
	// URL of the registry, e.g. "https://registry-1.docker.io" (http:// for plain HTTP).
	URL      string `toml:"url"`
	Username string `toml:"username"`
	Password string `toml:"password"`
	// AuthPassthrough: every client must send Basic credentials that the
	// upstream accepts for the repository; the proxy checks them (cached for
	// a minute) before serving anything from the shared store.
	AuthPassthrough bool `toml:"auth_passthrough"`
}

// Duration is a time.Duration written as "90s" in TOML.
type Duration time.Duration

func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("bad duration %q: %w", b, err)
	}
	*d = Duration(v)
	return nil
}

func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

// Size is a byte count written as "10GiB" or a number in TOML.
type Size int64

func (s *Size) UnmarshalText(b []byte) error {
	v, err := ParseSize(string(b))
	*s = Size(v)
	return err
}

func (s Size) MarshalText() ([]byte, error) { return []byte(units.BytesSize(float64(s))), nil }

// ParseSize parses "10GiB", "512M" or "1234".
func ParseSize(v string) (int64, error) {
	n, err := units.RAMInBytes(v)
	if err != nil {
		return 0, fmt.Errorf("bad size %q: %w", v, err)
	}
	return n, nil
}

// LoadConfig reads a TOML file; unknown keys are errors so typos do not pass silently.
func LoadConfig(path string) (Config, error) {
	var c Config
	f, err := os.Open(path)
	if err != nil {
		return c, fmt.Errorf("reading config: %w", err)
	}
	defer f.Close()
	dec := toml.NewDecoder(f).DisallowUnknownFields()
	if err := dec.Decode(&c); err != nil {
		return c, fmt.Errorf("parsing config %s: %w", path, err)
	}
	return c, nil
}

var nsKeyRe = regexp.MustCompile(`^[A-Za-z0-9.-]+(:[0-9]+)?$`)

// Normalize fills defaults and checks the configuration.
func (c *Config) Normalize() error {
	if c.Listen == "" {
		c.Listen = ":5000"
	}
	if c.Root == "" {
		c.Root = "/var/lib/dupproxy"
	}
	if c.CacheDir == "" {
		c.CacheDir = filepath.Join(c.Root, "cache")
	}
	if c.CacheSize == 0 {
		c.CacheSize = 10 << 30
	}
	if c.ServeStale == nil {
		t := true
		c.ServeStale = &t
	}
	if c.Predict == nil {
		t := true
		c.Predict = &t
	}
	if c.GCInterval == 0 {
		c.GCInterval = Duration(time.Hour)
	}
	if c.GCGrace == 0 {
		c.GCGrace = Duration(time.Hour)
	}
	if c.MaxObjectsPerRequest <= 0 {
		c.MaxObjectsPerRequest = 10000
	}
	if c.MaxResponseBytes <= 0 {
		c.MaxResponseBytes = 256 << 20
	}
	switch c.Storage.Type {
	case "":
		c.Storage.Type = "fs"
	case "fs":
	case "s3":
		if c.Storage.S3.Bucket == "" {
			return fmt.Errorf("storage.s3.bucket is required with storage type s3")
		}
	default:
		return fmt.Errorf("storage.type %q: want fs or s3", c.Storage.Type)
	}
	if c.Storage.LeaseTTL <= 0 {
		c.Storage.LeaseTTL = Duration(2 * time.Minute)
	}
	if c.Upstream == "" && len(c.Upstreams) == 0 {
		return fmt.Errorf("no upstream configured (--upstream or upstream/upstreams in the config)")
	}
	check := func(name, raw string) error {
		u, err := url.Parse(raw)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return fmt.Errorf("upstream %s: URL %q must be http(s)://host[:port]", name, raw)
		}
		return nil
	}
	if c.Upstream != "" {
		if err := check("default", c.Upstream); err != nil {
			return err
		}
	}
	for k, u := range c.Upstreams {
		if !nsKeyRe.MatchString(k) {
			return fmt.Errorf("upstreams: key %q is not a registry host", k)
		}
		if err := check(k, u.URL); err != nil {
			return err
		}
	}
	return nil
}

func (c *Config) serveStale() bool { return c.ServeStale == nil || *c.ServeStale }
func (c *Config) predict() bool    { return c.Predict == nil || *c.Predict }
