package main

import (
	"context"
	"flag"
	"fmt"

	"github.com/dupsnap/dupsnap/internal/cli"
	"github.com/dupsnap/dupsnap/proxy"
)

func init() {
	var (
		f         storeFlags
		storeSize string
		grace     string
	)
	app.Register(&cli.Command{
		Name:  "gc",
		Usage: "gc [--config FILE] [--root DIR] [--store-size N] [--grace D]",
		Short: "evict least recently pulled images beyond the store bound and collect unreferenced data",
		Long: `Offline garbage collection of the store under --root (a running "dupproxy
serve" collects by itself every gc_interval and holds the store's lock).
With store_size (or --store-size) set, whole images are evicted by last access
until the store fits; then layers, blobs and file objects no kept manifest
references, and older than the grace period, are deleted.`,
		Flags: func(fs *flag.FlagSet) {
			f.register(fs, false)
			fs.StringVar(&storeSize, "store-size", "", "bound of the store, e.g. 100GiB (default: config store_size, else unbounded)")
			fs.StringVar(&grace, "grace", "", "keep data younger than this, e.g. 10m (default: config gc_grace, else 1h)")
		},
		Run: func(ctx context.Context, args []string) error {
			cfg, err := f.loadOffline()
			if err != nil {
				return err
			}
			if storeSize != "" {
				n, err := proxy.ParseSize(storeSize)
				if err != nil {
					return cli.Usagef("--store-size: %v", err)
				}
				cfg.StoreSize = proxy.Size(n)
			}
			if grace != "" {
				var d proxy.Duration
				if err := d.UnmarshalText([]byte(grace)); err != nil {
					return cli.Usagef("--grace: %v", err)
				}
				cfg.GCGrace = d
			}
			s, err := proxy.Open(ctx, cfg)
			if err != nil {
				return err
			}
			defer s.Close()
			rep, err := s.GC(ctx)
			if err != nil {
				return err
			}
			fmt.Printf("images evicted: %d\nlayers dropped: %d\nblobs deleted:  %d (%d bytes)\nobjects freed:  %d (%d bytes)\nphysical bytes: %d -> %d\n",
				rep.ImagesEvicted, rep.LayersDropped, rep.BlobsDeleted, rep.BlobBytesFreed, rep.Objects, rep.ObjectBytes, rep.PhysicalBefore, rep.PhysicalAfter)
			return nil
		},
	})
}
