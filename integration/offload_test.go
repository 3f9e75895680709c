package integration

import (
	"context"
	"fmt"
	"io"
	"math/rand"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/dupsnap/dupsnap/integration/harness"
	"github.com/dupsnap/dupsnap/pkg/cas"
)

// offloadEnv: registry <- dupproxy (containerd's hosts.toml mirror) <- MITM
// <- dupsnap (offload endpoint), with a private containerd.
type offloadEnv struct {
	*env
	px       *harness.Dupproxy
	mitm     *harness.MITM
	hostsDir string
	metrics  string // dupsnap's metrics URL
	base     v1.Layer
}

func newOffloadEnv(ctx context.Context, t *testing.T) *offloadEnv {
	t.Helper()
	harness.Require(t, harness.DupsnapBin(), harness.DupproxyBin())
	dir := harness.TempDir(t, "dsoff-")
	e := &offloadEnv{env: &env{dir: dir}}
	e.reg = harness.StartRegistry(ctx, t, dir)
	e.px = harness.StartDupproxy(ctx, t, dir, "http://"+e.reg.Host)
	e.mitm = harness.StartMITM(t, e.px.URL)
	// containerd's socket path is fixed by the harness; dupsnap dials it
	// lazily to find repositories for pulls without cri.* labels.
	cfg := fmt.Sprintf("[cas]\nno_sync = true\n[offload]\ndefault = %q\ntimeout = \"60s\"\n[offload.containerd]\naddress = %q\n",
		e.mitm.URL, filepath.Join(dir, "containerd.sock"))
	maddr := freeTCP(t)
	e.metrics = "http://" + maddr + "/metrics"
	e.d = harness.StartDupsnap(ctx, t, dir, cfg, "--metrics-address", maddr)
	e.c = harness.StartContainerd(ctx, t, dir, harness.ContainerdOptions{DupsnapSocket: e.d.Socket, DupsnapRoot: e.d.Root, MaxConcurrentUnpacks: 2})
	e.hostsDir = filepath.Join(dir, "hosts")
	hd := filepath.Join(e.hostsDir, e.reg.Host)
	if err := os.MkdirAll(hd, 0o755); err != nil {
		t.Fatal(err)
	}
	hosts := fmt.Sprintf("server = %q\n\n[host.%q]\n  capabilities = [\"pull\", \"resolve\"]\n", "http://"+e.reg.Host, e.px.URL)
	if err := os.WriteFile(filepath.Join(hd, "hosts.toml"), []byte(hosts), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			if keep := os.Getenv("DUPSNAP_KEEP_LOG"); keep != "" {
				if b, err := os.ReadFile(e.d.LogFile); err == nil {
					os.WriteFile(keep, b, 0o644)
				}
				if b, err := os.ReadFile(e.px.LogFile); err == nil {
					os.WriteFile(keep+".dupproxy", b, 0o644)
				}
			}
			t.Log(e.d.Tail())
			t.Log(harness.LogTail(e.px.LogFile, 20))
			t.Log(harness.LogTail(e.c.LogFile, 20))
		}
	})
	return e
}

func freeTCP(t *testing.T) string {
	t.Helper()
	l, err := netListen()
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func (e *offloadEnv) pull(ctx context.Context, t *testing.T, ref string) time.Duration {
	t.Helper()
	start := time.Now()
	e.ctr(ctx, t, 2*time.Minute, "image", "pull", "--plain-http", "--hosts-dir", e.hostsDir, "--snapshotter", "dupsnap", ref)
	return time.Since(start)
}

func (e *offloadEnv) metric(ctx context.Context, t *testing.T, prefix string) float64 {
	t.Helper()
	v, err := harness.ScrapeMetric(ctx, e.metrics, prefix)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func (e *offloadEnv) contentHas(ctx context.Context, t *testing.T, img v1.Image) (has, lacks int) {
	t.Helper()
	ls := e.ctr(ctx, t, 30*time.Second, "content", "ls", "-q")
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range layers {
		d, _ := l.Digest()
		if strings.Contains(ls, d.String()) {
			has++
		} else {
			lacks++
		}
	}
	return has, lacks
}

func blobBytes(t *testing.T, imgs ...v1.Image) int64 {
	var n int64
	for _, img := range imgs {
		ls, err := img.Layers()
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range ls {
			s, _ := l.Size()
			n += s
		}
	}
	return n
}

// uniqueImage is base + a layer of fresh random files + their checksums.
func (e *offloadEnv) uniqueImage(t *testing.T, seed int64) v1.Image {
	t.Helper()
	r := rand.New(rand.NewSource(seed))
	var files []harness.File
	for i := 0; i < 12; i++ {
		b := make([]byte, 2000+r.Intn(60000))
		r.Read(b)
		files = append(files, harness.File{Path: fmt.Sprintf("data/%d/f%02d", seed, i), Data: b, Mode: 0o644})
	}
	sums, err := harness.ChecksumList(files)
	if err != nil {
		t.Fatal(err)
	}
	dl, err := harness.Layer(files)
	if err != nil {
		t.Fatal(err)
	}
	cl, err := harness.Layer([]harness.File{{Path: "checks.sha256", Data: sums}})
	if err != nil {
		t.Fatal(err)
	}
	img, err := harness.Image([]string{"/bin/sh"}, e.base, dl, cl)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// verifyRun runs a container that checks every file's sha256 and that no
// file gained a setuid bit (what the manifest tamper does).
func (e *offloadEnv) verifyRun(ctx context.Context, t *testing.T, ref, id string) {
	t.Helper()
	out, err := e.run(ctx, t, ref, id, "set -e; sha256sum -c --quiet /checks.sha256; for f in $(cat /checks.sha256 | while read s p; do echo $p; done); do test ! -u \"$f\"; done; echo ALLOK")
	if err != nil || !strings.Contains(out, "ALLOK") {
		t.Fatalf("container on %s: %v\n%s", ref, err, out)
	}
}

// TestOffloadPull: images sharing files pulled with ctr (transfer service,
// cri.* annotations on) arrive as manifests + missing objects: no layer blob
// in containerd's content store, dupproxy sends exactly what dupsnap
// receives, every object once; containers see the right files. Then a pull
// as nerdctl does (no cri.* labels), tampering by a MITM, and dupproxy down.
func TestOffloadPull(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 170*time.Second)
	defer cancel()
	e := newOffloadEnv(ctx, t)
	ti := buildImages(t)
	bl, err := harness.Layer(ti.base)
	if err != nil {
		t.Fatal(err)
	}
	e.base = bl
	ref1, err := e.reg.Push(ctx, "off/one:v1", ti.img1)
	if err != nil {
		t.Fatal(err)
	}
	ref2, err := e.reg.Push(ctx, "off/two:v1", ti.img2)
	if err != nil {
		t.Fatal(err)
	}

	// Warm dupproxy (the registry tier has the layers; the node does not):
	// fetch the images' blobs through it once.
	for _, x := range []struct {
		repo string
		img  v1.Image
	}{{"off/one", ti.img1}, {"off/two", ti.img2}} {
		if os.Getenv("DUPSNAP_OFFLOAD_COLD") != "" {
			break // measure with a cold registry tier
		}
		warmProxy(ctx, t, e.px.URL, e.reg.Host, x.repo, x.img)
	}
	t1 := e.pull(ctx, t, ref1)
	t2 := e.pull(ctx, t, ref2)
	dupDisk := diskUsage(e.d.Root) + diskUsage(filepath.Join(e.c.Dir, "root", "io.containerd.content.v1.content"))
	for _, img := range []v1.Image{ti.img1, ti.img2} {
		if has, _ := e.contentHas(ctx, t, img); has != 0 {
			t.Errorf("containerd's content store holds %d layer blobs of an offloaded image", has)
		}
	}
	fetched := e.metric(ctx, t, `dupsnap_offload_layers_total{result="fetched"}`)
	wire := e.metric(ctx, t, "dupsnap_offload_wire_bytes_total")
	sent, err := e.px.Metric(ctx, `dupproxy_served_bytes_total{api="dedup_`)
	if err != nil {
		t.Fatal(err)
	}
	seen := e.mitm.Bytes("objects") + e.mitm.Bytes("manifest")
	objs := e.metric(ctx, t, "dupsnap_offload_objects_fetched_total")
	blobs := blobBytes(t, ti.img1, ti.img2)
	t.Logf("pulls %v + %v; layers offloaded %v; dedup bytes: dupproxy sent %v, MITM saw %d, dupsnap counted %v; compressed blobs %d (ratio %.2f)",
		t1, t2, fetched, sent, seen, wire, blobs, float64(seen)/float64(blobs))
	// img2 shares the base layer (committed once) and carries img1's files
	// at other paths: 3 + 2 distinct layers.
	if fetched != 5 {
		t.Errorf("%v layers offloaded, want 5", fetched)
	}
	if int64(sent) != seen || int64(wire) != seen {
		t.Errorf("bytes disagree: dupproxy sent %v, MITM saw %d, dupsnap counted %v", sent, seen, wire)
	}
	if seen*10 > blobs*7 {
		t.Errorf("dedup bytes %d over 0.7x of the compressed blobs %d", seen, blobs)
	}
	// Every object received once: the node CAS has exactly as many objects.
	c, err := cas.Open(filepath.Join(e.d.Root, "cas"), cas.Options{})
	if err != nil {
		t.Fatal(err)
	}
	nobj := 0
	c.Walk(ctx, func(cas.Info) error { nobj++; return nil })
	c.Close()
	if int(objs) != nobj {
		t.Errorf("received %v objects, node CAS holds %d", objs, nobj)
	}
	// Nothing received was thrown away (a cut or abandoned stream whose
	// objects were fetched again would show here first).
	if w := e.metric(ctx, t, "dupsnap_offload_wasted_objects_total"); w != 0 {
		t.Errorf("%v objects received and not used", w)
	}
	e.verifyRun(ctx, t, ref1, "off1")
	e.verifyRun(ctx, t, ref2, "off2")

	// The same two images with overlayfs straight from the registry, in
	// another namespace (content is fetched again): time and node disk.
	contentBefore := diskUsage(filepath.Join(e.c.Dir, "root", "io.containerd.content.v1.content"))
	var tOvl time.Duration
	for _, ref := range []string{ref1, ref2} {
		start := time.Now()
		out, err := harness.Run(ctx, 2*time.Minute, nil, filepath.Join(harness.ToolsDir(), "ctr"), "--address", e.c.Address,
			"--namespace", "ovl", "image", "pull", "--plain-http", "--snapshotter", "overlayfs", ref)
		if err != nil {
			t.Fatalf("overlayfs pull: %v\n%s", err, out)
		}
		tOvl += time.Since(start)
	}
	ovlDisk := diskUsage(filepath.Join(e.c.Dir, "root", "io.containerd.snapshotter.v1.overlayfs")) +
		diskUsage(filepath.Join(e.c.Dir, "root", "io.containerd.content.v1.content")) - contentBefore
	t.Logf("NUMBERS pull time dupsnap+dupproxy %v vs overlayfs+registry %v (%.2fx); wire %d vs compressed blobs %d (%.2fx); node disk %d vs %d (%.2fx)",
		t1+t2, tOvl, float64(t1+t2)/float64(tOvl), seen, blobs, float64(seen)/float64(blobs), dupDisk, ovlDisk, float64(dupDisk)/float64(ovlDisk))

	// As nerdctl pulls: containerd Go client, plain WithPullSnapshotter,
	// no label wrapper; the repository is found in containerd's content store.
	img3 := e.uniqueImage(t, 3)
	ref3, err := e.reg.Push(ctx, "off/three:v1", img3)
	if err != nil {
		t.Fatal(err)
	}
	if err := clientPull(ctx, e.c.Address, e.c.Namespace, e.hostsDir, ref3, "dupsnap"); err != nil {
		t.Fatalf("client pull: %v\n%s", err, e.d.Tail())
	}
	if f := e.metric(ctx, t, `dupsnap_offload_layers_total{result="fetched"}`); f != fetched+2 {
		t.Errorf("client pull offloaded %v layers, want 2", f-fetched)
	}
	if has, _ := e.contentHas(ctx, t, img3); has != 0 {
		t.Errorf("client pull left %d layer blobs in the content store", has)
	}
	e.verifyRun(ctx, t, ref3, "off3")

	// Tampering: nothing wrong is committed, the pull falls back and succeeds.
	for i, mode := range []int32{harness.TamperObject, harness.TamperManifest, harness.TamperTruncate} {
		img := e.uniqueImage(t, int64(10+i))
		ref, err := e.reg.Push(ctx, fmt.Sprintf("off/tamper%d:v1", i), img)
		if err != nil {
			t.Fatal(err)
		}
		before := e.metric(ctx, t, `dupsnap_offload_layers_total{result="corrupt"}`) + e.metric(ctx, t, `dupsnap_offload_layers_total{result="unreachable_or_error"}`)
		fetchedBefore := e.metric(ctx, t, "dupsnap_offload_objects_fetched_total")
		wastedBefore := e.metric(ctx, t, "dupsnap_offload_wasted_objects_total")
		e.mitm.SetMode(mode)
		e.pull(ctx, t, ref)
		e.mitm.SetMode(harness.TamperNone)
		after := e.metric(ctx, t, `dupsnap_offload_layers_total{result="corrupt"}`) + e.metric(ctx, t, `dupsnap_offload_layers_total{result="unreachable_or_error"}`)
		if after-before != 2 {
			t.Errorf("tamper mode %d: %v layers refused, want 2", mode, after-before)
		}
		// Every object staged for a refused layer is dropped, none reaches
		// the node through offloading; with a tampered manifest all 13 of the
		// image's new objects arrive intact before the tar check refuses them.
		df := e.metric(ctx, t, "dupsnap_offload_objects_fetched_total") - fetchedBefore
		dw := e.metric(ctx, t, "dupsnap_offload_wasted_objects_total") - wastedBefore
		t.Logf("tamper mode %d: %v objects fetched, %v wasted", mode, df, dw)
		if dw != df || mode == harness.TamperManifest && df != 13 {
			t.Errorf("tamper mode %d: %v objects fetched, %v wasted", mode, df, dw)
		}
		if has, _ := e.contentHas(ctx, t, img); has != 2 {
			t.Errorf("tamper mode %d: fallback downloaded %d of 2 new layer blobs", mode, has)
		}
		e.verifyRun(ctx, t, ref, fmt.Sprintf("tamper%d", i))
	}

	// dupproxy down: containerd falls back to the registry, dupsnap to an
	// ordinary unpack; no error.
	e.px.Proc.Kill()
	img9 := e.uniqueImage(t, 9)
	ref9, err := e.reg.Push(ctx, "off/down:v1", img9)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	e.pull(ctx, t, ref9)
	t.Logf("pull with dupproxy down: %v", time.Since(start))
	e.verifyRun(ctx, t, ref9, "down")
}

// warmProxy GETs an image's manifest and layer blobs through dupproxy, as a
// first node pulling through it would (dupproxy ingests them).
func warmProxy(ctx context.Context, t *testing.T, proxyURL, regHost, repo string, img v1.Image) {
	t.Helper()
	get := func(p string, accept string) {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, proxyURL+"/v2/"+repo+p+"?ns="+regHost, nil)
		if accept != "" {
			req.Header.Set("Accept", accept)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("warm %s%s: %s", repo, p, resp.Status)
		}
	}
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	mt, _ := img.MediaType()
	get("/manifests/"+d.String(), string(mt))
	ls, _ := img.Layers()
	for _, l := range ls {
		ld, _ := l.Digest()
		get("/blobs/"+ld.String(), "")
	}
}

// diskUsage is the allocated size of the files under dir (hardlinks once).
func diskUsage(dir string) int64 {
	var n int64
	seen := map[uint64]bool{}
	filepath.Walk(dir, func(_ string, fi os.FileInfo, err error) error {
		if err != nil {
			return nil
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			if seen[st.Ino] {
				return nil
			}
			seen[st.Ino] = true
			n += st.Blocks * 512
		}
		return nil
	})
	return n
}
