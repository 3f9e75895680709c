package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"

	units "github.com/docker/go-units"

	"github.com/dupsnap/dupsnap/internal/cli"
	"github.com/dupsnap/dupsnap/proxy"
)

func init() {
	var (
		f       storeFlags
		jsonOut bool
	)
	app.Register(&cli.Command{
		Name:  "stats",
		Usage: "stats [--config FILE] [--root DIR] [--json]",
		Short: "report layers, recipe-restorable layers, retained and logical/physical bytes",
		Long: `Walks the store under --root and prints: images and layers kept; how layers
are restored (rebuilt tar, gzip/zstd recipe, or compressed blob retained); the
bytes retained; logical bytes (what the store can serve) against physical bytes
(file objects as stored + layout manifests + blob store). Needs the root not to
be in use by "dupproxy serve" (the store is locked); query its /metrics instead.`,
		Flags: func(fs *flag.FlagSet) {
			f.register(fs, false)
			fs.BoolVar(&jsonOut, "json", false, "print JSON")
		},
		Run: func(ctx context.Context, args []string) error {
			cfg, err := f.loadOffline()
			if err != nil {
				return err
			}
			s, err := proxy.Open(ctx, cfg)
			if err != nil {
				return err
			}
			defer s.Close()
			st, err := s.Stats(ctx)
			if err != nil {
				return err
			}
			if jsonOut {
				enc := json.NewEncoder(os.Stdout)
				enc.SetIndent("", "  ")
				return enc.Encode(st)
			}
			b := func(n int64) string { return units.BytesSize(float64(n)) }
			ratio := 0.0
			if st.LogicalBytes > 0 {
				ratio = float64(st.PhysicalBytes) / float64(st.LogicalBytes)
			}
			fmt.Printf("images:            %d\n", st.Images)
			fmt.Printf("layers:            %d (tar %d, recipe-restorable %d of which %d in parallel chunks, retained %d)\n",
				st.Layers, st.TarLayers, st.RecipeLayers, st.ParallelRecipes, st.RetainedLayers)
			fmt.Printf("retained bytes:    %s\n", b(st.RetainedBytes))
			fmt.Printf("file objects:      %d (%s, %s on disk)\n", st.Objects, b(st.ObjectBytes), b(st.ObjectStored))
			fmt.Printf("logical bytes:     %s\n", b(st.LogicalBytes))
			fmt.Printf("physical bytes:    %s (%.2fx)\n", b(st.PhysicalBytes), ratio)
			fmt.Printf("restore cache:     %d blobs, %s\n", st.CacheBlobs, b(st.CacheBytes))
			return nil
		},
	})
}
