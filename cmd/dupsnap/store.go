package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/dupsnap/dupsnap/internal/cli"
	"github.com/dupsnap/dupsnap/pkg/cas"
	"github.com/dupsnap/dupsnap/pkg/layout"
)

// storeCmd is one "dupsnap store <name>" operation.
type storeCmd struct {
	usage string
	short string
	flags func(fs *flag.FlagSet)
	run   func(ctx context.Context, root string, args []string) error
}

var storeCmds = map[string]*storeCmd{}

func init() {
	storeCmds["import-layer"] = &storeCmd{
		usage: "import-layer --root DIR FILE...",
		short: "import layer tars (plain, gzip or zstd; '-' is stdin); one JSON line per layer",
		run:   storeImport,
	}
	storeCmds["export-layer"] = &storeCmd{
		usage: "export-layer --root DIR DIFF_ID",
		short: "write the layer's exact uncompressed tar to stdout",
		run:   storeExport,
	}
	storeCmds["stats"] = &storeCmd{
		usage: "stats --root DIR [--json]",
		short: "layers, objects, logical and physical bytes, dedup ratio",
		flags: func(fs *flag.FlagSet) { fs.Bool("json", false, "print one JSON object") },
		run:   storeStats,
	}
	storeCmds["fsck"] = &storeCmd{
		usage: "fsck --root DIR [--repair] [--export]",
		short: "verify every object and manifest; exit 1 on damage",
		flags: func(fs *flag.FlagSet) {
			fs.Bool("repair", false, "remove corrupt objects and stale temp files")
			fs.Bool("export", false, "also rebuild every layer and check it hashes to its diffID")
		},
		run: storeFsck,
	}
	storeCmds["gc"] = &storeCmd{
		usage: "gc --root DIR [--grace DURATION]",
		short: "delete objects no manifest references",
		flags: func(fs *flag.FlagSet) {
			fs.Duration("grace", time.Hour, "keep unreferenced objects younger than this")
		},
		run: storeGC,
	}
	var b strings.Builder
	names := make([]string, 0, len(storeCmds))
	for n := range storeCmds {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(&b, "  %-13s %s\n                %s\n", n, storeCmds[n].short, "dupsnap store "+storeCmds[n].usage)
	}
	app.Register(&cli.Command{
		Name:  "store",
		Usage: "store <operation> --root DIR [flags] [args]",
		Short: "inspect and maintain the node store (file CAS + layer manifests)",
		Long: `The store is what the snapshotter keeps under its root: <root>/cas holds
file contents by sha256, <root>/manifests one manifest per layer (by diffID)
that lists every tar entry and the exact tar bytes around the contents. All
operations are safe while the daemon runs on the same root.

Operations:
` + b.String() + `
--root defaults to ` + defaultRoot + `. "dupsnap store OPERATION --help" shows an
operation's flags. See docs/store.md for the on-disk layout and durability.`,
		Run: runStore,
	})
}

func runStore(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return cli.Usagef("missing operation")
	}
	sc, ok := storeCmds[args[0]]
	if !ok {
		return cli.Usagef("unknown operation %q", args[0])
	}
	fs := flag.NewFlagSet("dupsnap store "+args[0], flag.ContinueOnError)
	root := fs.String("root", defaultRoot, "store root (the daemon's root: <root>/cas, <root>/manifests)")
	if sc.flags != nil {
		sc.flags(fs)
	}
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: dupsnap store %s\n\n%s\n\nFlags:\n", sc.usage, sc.short)
		fs.PrintDefaults()
	}
	fs.SetOutput(os.Stderr)
	if err := fs.Parse(args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fs.SetOutput(os.Stdout)
			fs.Usage()
			return nil
		}
		return cli.Usagef("%v", err)
	}
	ctx = context.WithValue(ctx, flagsKey{}, fs)
	return sc.run(ctx, *root, fs.Args())
}

type flagsKey struct{}

func flagValue[T any](ctx context.Context, name string) T {
	fs := ctx.Value(flagsKey{}).(*flag.FlagSet)
	return fs.Lookup(name).Value.(flag.Getter).Get().(T)
}

type importLine struct {
	DiffID     digest.Digest `json:"diff_id"`
	File       string        `json:"file"`
	Files      int           `json:"files"`
	Entries    int           `json:"entries"`
	Bytes      int64         `json:"bytes"`
	TarBytes   int64         `json:"tar_bytes"`
	Objects    int           `json:"objects"`
	NewObjects int           `json:"new_objects"`
	NewBytes   int64         `json:"new_bytes"`
	Seconds    float64       `json:"seconds"`
}

func storeImport(ctx context.Context, root string, args []string) error {
	if len(args) == 0 {
		return cli.Usagef("import-layer needs at least one FILE")
	}
	c, s, err := layout.OpenRoot(root)
	if err != nil {
		return err
	}
	defer c.Close()
	enc := json.NewEncoder(os.Stdout)
	for _, name := range args {
		var r io.Reader = os.Stdin
		if name != "-" {
			f, err := os.Open(name)
			if err != nil {
				return err
			}
			defer f.Close()
			r = f
		}
		start := time.Now()
		m, st, err := s.ImportWithStats(ctx, r, layout.IngestOptions{})
		if err != nil {
			return fmt.Errorf("import %s: %w", name, err)
		}
		if err := enc.Encode(importLine{
			DiffID: m.DiffID, File: name, Files: m.Files(), Entries: len(m.Entries),
			Bytes: m.ContentBytes(), TarBytes: m.Size, Objects: st.Objects,
			NewObjects: st.NewObjects, NewBytes: st.NewBytes,
			Seconds: time.Since(start).Seconds(),
		}); err != nil {
			return err
		}
	}
	return nil
}

func storeExport(ctx context.Context, root string, args []string) error {
	if len(args) != 1 {
		return cli.Usagef("export-layer needs exactly one DIFF_ID")
	}
	id, err := digest.Parse(args[0])
	if err != nil {
		return cli.Usagef("bad DIFF_ID %q: %v", args[0], err)
	}
	c, s, err := layout.OpenRoot(root)
	if err != nil {
		return err
	}
	defer c.Close()
	m, err := s.Get(ctx, id)
	if err != nil {
		return err
	}
	w := bufio.NewWriterSize(os.Stdout, 1<<20)
	if err := layout.Export(ctx, c, m, w); err != nil {
		return err
	}
	return w.Flush()
}

type statsOut struct {
	Layers        int     `json:"layers"`
	Objects       int     `json:"objects"`
	LogicalBytes  int64   `json:"logical_bytes"`
	LayerBytes    int64   `json:"layer_bytes"`
	PhysicalBytes int64   `json:"physical_bytes"`
	ManifestBytes int64   `json:"manifest_bytes"`
	DedupRatio    float64 `json:"dedup_ratio"`
	Unreferenced  int     `json:"unreferenced_objects"`
}

func storeStats(ctx context.Context, root string, args []string) error {
	c, s, err := layout.OpenRoot(root)
	if err != nil {
		return err
	}
	defer c.Close()
	var st statsOut
	ids, err := s.List(ctx)
	if err != nil {
		return err
	}
	refs := map[digest.Digest]struct{}{}
	for _, id := range ids {
		m, err := s.Get(ctx, id)
		if err != nil {
			if errors.Is(err, layout.ErrNotFound) {
				continue
			}
			return err
		}
		st.Layers++
		st.LogicalBytes += m.ContentBytes()
		st.LayerBytes += m.Size
		if fi, err := os.Stat(s.Dir() + "/sha256/" + id.Encoded()); err == nil {
			st.ManifestBytes += fi.Size()
		}
		for _, d := range m.Objects() {
			refs[d] = struct{}{}
		}
	}
	if err := c.Walk(ctx, func(in cas.Info) error {
		st.Objects++
		st.PhysicalBytes += in.Stored
		if _, ok := refs[in.Digest]; !ok {
			st.Unreferenced++
		}
		return nil
	}); err != nil {
		return err
	}
	if st.PhysicalBytes > 0 {
		st.DedupRatio = float64(st.LogicalBytes) / float64(st.PhysicalBytes)
	}
	if flagValue[bool](ctx, "json") {
		return json.NewEncoder(os.Stdout).Encode(st)
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "layers\t%d\n", st.Layers)
	fmt.Fprintf(tw, "objects\t%d\t(%d unreferenced)\n", st.Objects, st.Unreferenced)
	fmt.Fprintf(tw, "logical bytes\t%d\t(file contents of all layers)\n", st.LogicalBytes)
	fmt.Fprintf(tw, "layer bytes\t%d\t(uncompressed tars)\n", st.LayerBytes)
	fmt.Fprintf(tw, "physical bytes\t%d\t(objects on disk)\n", st.PhysicalBytes)
	fmt.Fprintf(tw, "manifest bytes\t%d\n", st.ManifestBytes)
	fmt.Fprintf(tw, "dedup ratio\t%.2f\t(logical / physical)\n", st.DedupRatio)
	return tw.Flush()
}

func storeFsck(ctx context.Context, root string, args []string) error {
	c, s, err := layout.OpenRoot(root)
	if err != nil {
		return err
	}
	defer c.Close()
	repair := flagValue[bool](ctx, "repair")
	rep, err := c.Fsck(ctx, repair)
	if err != nil {
		return err
	}
	damage := len(rep.Corrupt)
	for _, d := range rep.Corrupt {
		fmt.Printf("corrupt object %s\n", d)
	}
	ids, err := s.List(ctx)
	if err != nil {
		return err
	}
	export := flagValue[bool](ctx, "export")
	for _, id := range ids {
		m, err := s.Get(ctx, id)
		if err != nil {
			if errors.Is(err, layout.ErrNotFound) {
				continue
			}
			fmt.Printf("bad manifest %s: %v\n", id, err)
			damage++
			continue
		}
		for d, size := range m.ObjectSizes() {
			in, err := c.Stat(d)
			if err != nil {
				fmt.Printf("layer %s: missing object %s: %v\n", id, d, err)
				damage++
			} else if in.Size != size {
				fmt.Printf("layer %s: object %s has %d bytes, want %d\n", id, d, in.Size, size)
				damage++
			}
		}
		if export {
			h := digest.SHA256.Digester()
			if err := layout.Export(ctx, c, m, h.Hash()); err != nil {
				fmt.Printf("layer %s: export: %v\n", id, err)
				damage++
			} else if h.Digest() != id {
				fmt.Printf("layer %s: export hashes to %s\n", id, h.Digest())
				damage++
			}
		}
	}
	fmt.Printf("objects %d (%d bytes), layers %d, temp files %d, damaged %d\n", rep.Objects, rep.Bytes, len(ids), rep.TempFiles, damage)
	if damage > 0 {
		return fmt.Errorf("fsck: %d problems found", damage)
	}
	return nil
}

func storeGC(ctx context.Context, root string, args []string) error {
	c, s, err := layout.OpenRoot(root)
	if err != nil {
		return err
	}
	defer c.Close()
	n, freed, err := s.Collect(ctx, flagValue[time.Duration](ctx, "grace"))
	fmt.Printf("removed %d objects, %d bytes\n", n, freed)
	return err
}
