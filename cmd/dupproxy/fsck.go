package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"

	"github.com/dupsnap/dupsnap/internal/cli"
	"github.com/dupsnap/dupsnap/proxy"
)

func init() {
	var (
		f       storeFlags
		jsonOut bool
	)
	app.Register(&cli.Command{
		Name:  "fsck",
		Usage: "fsck [--config FILE] [--root DIR] [--json]",
		Short: "prove the store consistent: every layout's objects exist and hash right",
		Long: `Reads the whole store: every layout manifest's file objects must exist and
hash to their names, every layer record must have its layout manifest (and its
retained blob), every blob must hash to its digest. Exits 1 listing the problems
otherwise. With an S3 backend it may run while replicas serve, from any host:
give it its own --root (it only holds scratch there).`,
		Flags: func(fs *flag.FlagSet) {
			f.register(fs, false)
			fs.BoolVar(&jsonOut, "json", false, "print JSON")
		},
		Run: func(ctx context.Context, args []string) error {
			cfg, err := f.loadOffline()
			if err != nil {
				return err
			}
			cfg.Offline = true
			s, err := proxy.Open(ctx, cfg)
			if err != nil {
				return err
			}
			defer s.Close()
			rep, err := s.Check(ctx)
			if err != nil {
				return err
			}
			if jsonOut {
				enc := json.NewEncoder(os.Stdout)
				enc.SetIndent("", "  ")
				if err := enc.Encode(rep); err != nil {
					return err
				}
			} else {
				fmt.Printf("layouts: %d\nobjects: %d (%d bytes) verified\nlayers:  %d\nblobs:   %d verified\nproblems: %d\n",
					rep.Layouts, rep.Objects, rep.Bytes, rep.Layers, rep.Blobs, len(rep.Problems))
				for _, p := range rep.Problems {
					fmt.Println("  " + p)
				}
			}
			if len(rep.Problems) > 0 {
				return fmt.Errorf("store inconsistent: %d problem(s)", len(rep.Problems))
			}
			return nil
		},
	})
}
