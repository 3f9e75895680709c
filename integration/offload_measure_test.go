package integration

import (
	"context"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/dupsnap/dupsnap/integration/harness"
)

// TestOffloadPullMeasure times the pull of an image set that shares most
// files (versions of one application: every version's runtime layer has a
// new digest but mostly the same files) via dupsnap+dupproxy (warm) against
// overlayfs pulling the same images straight from the registry, in one run,
// and prints the offload's per-phase times per layer. Gated: it is a
// measurement, not a check (DUPSNAP_MEASURE=1; DUPSNAP_MEASURE_MB sizes the
// shared runtime layer, default 24).
func TestOffloadPullMeasure(t *testing.T) {
	if os.Getenv("DUPSNAP_MEASURE") == "" {
		t.Skip("measurement; set DUPSNAP_MEASURE=1")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 170*time.Second)
	defer cancel()
	e := newOffloadEnv(ctx, t)
	mb := int64(24)
	fmt.Sscan(os.Getenv("DUPSNAP_MEASURE_MB"), &mb)
	imgs := versionedImages(t, 4, mb<<20)
	var refs []string
	for i, img := range imgs {
		ref, err := e.reg.Push(ctx, fmt.Sprintf("meas/app:v%d", i), img)
		if err != nil {
			t.Fatal(err)
		}
		warmProxy(ctx, t, e.px.URL, e.reg.Host, "meas/app", img)
		refs = append(refs, ref)
	}

	var tDup, tOvl time.Duration
	var perDup, perOvl []string
	for _, ref := range refs {
		d := e.pull(ctx, t, ref)
		tDup += d
		perDup = append(perDup, d.Round(time.Millisecond).String())
	}
	for _, ref := range refs {
		start := time.Now()
		out, err := harness.Run(ctx, 2*time.Minute, nil, filepath.Join(harness.ToolsDir(), "ctr"), "--address", e.c.Address,
			"--namespace", "ovl", "image", "pull", "--plain-http", "--snapshotter", "overlayfs", ref)
		if err != nil {
			t.Fatalf("overlayfs pull: %v\n%s", err, out)
		}
		d := time.Since(start)
		tOvl += d
		perOvl = append(perOvl, d.Round(time.Millisecond).String())
	}
	logPhases(t, e.d.LogFile)
	logUnpacks(t, e.c.LogFile)
	if f := e.metric(ctx, t, `dupsnap_offload_layers_total{result="fetched"}`); f != float64(3*len(refs)-len(refs)+1) {
		t.Logf("WARNING: %v layers offloaded, want %d", f, 2*len(refs)+1)
	}
	t.Logf("MEASURE pull time of %d images: dupsnap+dupproxy %v %v vs overlayfs+registry %v %v: %.2fx (blobs %d bytes, wire %v)",
		len(refs), tDup.Round(time.Millisecond), perDup, tOvl.Round(time.Millisecond), perOvl, float64(tDup)/float64(tOvl),
		blobBytes(t, imgs...), e.metric(ctx, t, "dupsnap_offload_wire_bytes_total"))
}

// versionedImages: n versions of an app; each is base + runtime layer (the
// same host files, plus a version file) + a small layer of its own.
func versionedImages(t *testing.T, n int, runtimeBytes int64) []v1.Image {
	t.Helper()
	base, err := harness.BaseFiles()
	if err != nil {
		t.Fatal(err)
	}
	data, err := harness.HostFiles([]string{"/usr/lib/x86_64-linux-gnu", "/usr/share", "/usr/lib"}, 4000, 2<<20, runtimeBytes)
	if err != nil {
		t.Fatal(err)
	}
	bl, err := harness.Layer(base)
	if err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewSource(42))
	var out []v1.Image
	for v := 0; v < n; v++ {
		// Each version changes a few files: a new digest for the whole layer.
		rt := append([]harness.File{}, data...)
		for k := 0; k < 5; k++ {
			b := make([]byte, 4096+r.Intn(100000))
			r.Read(b)
			rt = append(rt, harness.File{Path: fmt.Sprintf("opt/app/changed%d", k), Data: b, Mode: 0o644})
		}
		rl, err := harness.Layer(rt)
		if err != nil {
			t.Fatal(err)
		}
		b := make([]byte, 200000)
		r.Read(b)
		al, err := harness.Layer([]harness.File{{Path: "opt/app/bin", Data: b, Mode: 0o755}})
		if err != nil {
			t.Fatal(err)
		}
		img, err := harness.Image([]string{"/bin/sh"}, bl, rl, al)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, img)
	}
	return out
}

var phaseRE = regexp.MustCompile(`(objects|needed_objects|needed_bytes|took|t_manifest|t_objects|t_verify|t_commit|t_prefetch|prefetch_wire)=(\S+)`)

// logPhases prints the per-layer phase times from dupsnap's log.
func logPhases(t *testing.T, logFile string) {
	b, err := os.ReadFile(logFile)
	if err != nil {
		t.Log(err)
		return
	}
	for _, line := range strings.Split(string(b), "\n") {
		if !strings.Contains(line, "offload: layer pulled") {
			continue
		}
		var f []string
		for _, m := range phaseRE.FindAllStringSubmatch(line, -1) {
			f = append(f, m[1]+"="+m[2])
		}
		sort.Strings(f)
		t.Logf("PHASE %s", strings.Join(f, " "))
	}
}

var unpackRE = regexp.MustCompile(`duration=(\S+).*parallel=(\S+)|parallel=(\S+).*duration=(\S+)`)

// logUnpacks prints containerd's own unpack durations (and whether it
// unpacked layers in parallel).
func logUnpacks(t *testing.T, logFile string) {
	b, err := os.ReadFile(logFile)
	if err != nil {
		t.Log(err)
		return
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.Contains(line, "image unpacked") {
			if m := unpackRE.FindString(line); m != "" {
				t.Logf("UNPACK %s", m)
			}
		}
	}
}
