// Command dupproxy is the registry tier of dupsnap: a deduplicating OCI
// pull-through proxy. Each subcommand lives in its own file.
package main

import "github.com/dupsnap/dupsnap/internal/cli"

var app = &cli.App{
	Name:  "dupproxy",
	Short: "deduplicating OCI pull-through registry proxy",
}

func main() { app.Main() }
