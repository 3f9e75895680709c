// Command dupsnap is the node side of dupsnap: the containerd snapshotter
// daemon (serve), the per-container rootfs server (rootfs) and store tools.
// Each subcommand lives in its own file and registers itself in init().
package main

import "github.com/dupsnap/dupsnap/internal/cli"

var app = &cli.App{
	Name:  "dupsnap",
	Short: "file-level deduplicating containerd snapshotter",
}

func main() { app.Main() }
