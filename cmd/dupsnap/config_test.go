package main

import (
	"os"
	"path/filepath"
	"testing"
)

// docs/config.toml parses with every key known, and passthrough_min_size
// tells unset (nil: the pkg/rootfs default) from 0 (always passthrough).
func TestServeConfigPassthroughMinSize(t *testing.T) {
	c, err := loadServeConfig(filepath.Join("..", "..", "docs", "config.toml"), true)
	if err != nil {
		t.Fatal(err)
	}
	if c.Rootfs.PassthroughMinSize == nil || *c.Rootfs.PassthroughMinSize != 256<<10 {
		t.Fatalf("docs/config.toml: passthrough_min_size %v, want 262144", c.Rootfs.PassthroughMinSize)
	}
	dir := t.TempDir()
	for _, tc := range []struct {
		body string
		want *int64
	}{{"[rootfs]\n", nil}, {"[rootfs]\npassthrough_min_size = 0\n", new(int64)}} {
		p := filepath.Join(dir, "c.toml")
		if err := os.WriteFile(p, []byte(tc.body), 0o644); err != nil {
			t.Fatal(err)
		}
		c, err := loadServeConfig(p, true)
		if err != nil {
			t.Fatal(err)
		}
		got := c.Rootfs.PassthroughMinSize
		if (got == nil) != (tc.want == nil) || (got != nil && *got != *tc.want) {
			t.Fatalf("%q: passthrough_min_size %v, want %v", tc.body, got, tc.want)
		}
	}
}
