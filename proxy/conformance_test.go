package proxy_test

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/dupsnap/dupsnap/proxy"
	"github.com/dupsnap/dupsnap/proxy/proxytest"
)

// buildConformance builds the OCI distribution-spec conformance suite, a
// tool dependency of this module (go.mod "tool" line).
func buildConformance(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "oci-conformance")
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, "github.com/opencontainers/distribution-spec/conformance")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Skipf("cannot build the OCI conformance suite (module not available offline?): %v\n%s", err, out)
	}
	return bin
}

// TestOCIConformancePull runs the conformance suite's pull tests (read-only
// mode) against dupproxy in front of an in-process upstream: cold, warm, and
// with the upstream stopped after warm-up.
func TestOCIConformancePull(t *testing.T) {
	bin := buildConformance(t)
	up := proxytest.StartUpstream(t)
	const repo = "conformance/repo1"
	img := up.PushImage(t, repo, "v1", []proxytest.Layer{
		{Files: files("conf", "etc", 3, 4<<10), Format: proxytest.Gzip},
		{Files: files("conf2", "bin", 2, 8<<10), Format: proxytest.Uncompressed},
	})
	up.PushManifest(t, repo, "v2", ocispec.MediaTypeImageManifest, img.Manifest)
	// An artifact referring to the image, for the referrers API.
	empty := []byte("{}")
	ed := up.PushBlob(t, repo, empty)
	art := ocispec.Manifest{MediaType: ocispec.MediaTypeImageManifest, ArtifactType: "application/vnd.dupsnap.test",
		Config:  ocispec.Descriptor{MediaType: "application/vnd.oci.empty.v1+json", Digest: ed, Size: 2},
		Layers:  []ocispec.Descriptor{{MediaType: "application/vnd.oci.empty.v1+json", Digest: ed, Size: 2}},
		Subject: &ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, Digest: img.Digest, Size: int64(len(img.Manifest))}}
	art.SchemaVersion = 2
	ab, _ := json.Marshal(art)
	artD := up.PushManifest(t, repo, "sha256-art", ocispec.MediaTypeImageManifest, ab)

	p := proxytest.StartProxy(t, proxy.Config{Upstream: up.URL})
	var blobs []string
	for _, l := range img.Layers {
		blobs = append(blobs, l.Digest.String())
	}
	blobs = append(blobs, img.Config.Digest.String())
	env := append(os.Environ(),
		"OCI_REGISTRY="+p.Host, "OCI_TLS=disabled",
		"OCI_REPO1="+repo, "OCI_REPO2=conformance/repo2",
		"OCI_API_PUSH=false", "OCI_API_BLOBS_DELETE=false", "OCI_API_MANIFESTS_DELETE=false", "OCI_API_TAGS_DELETE=false",
		"OCI_RO_DATA_TAGS=v1 v2",
		"OCI_RO_DATA_MANIFESTS="+img.Digest.String()+" "+artD.String(),
		"OCI_RO_DATA_BLOBS="+strings.Join(blobs, " "),
		"OCI_RO_DATA_REFERRERS="+img.Digest.String(),
		"OCI_LOG=warn",
	)
	run := func(phase string) {
		dir := t.TempDir()
		logf, err := os.Create(filepath.Join(dir, "out.txt"))
		if err != nil {
			t.Fatal(err)
		}
		defer logf.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, bin)
		cmd.Dir = dir
		cmd.Env = append(env, "OCI_RESULTS_DIR="+filepath.Join(dir, "results"))
		cmd.Stdout, cmd.Stderr = logf, logf
		cmd.WaitDelay = 5 * time.Second
		err = cmd.Run() // read-only mode may exit non-zero: the result line decides
		out, _ := os.ReadFile(logf.Name())
		if !strings.Contains(string(out), "OCI Conformance Result: Pass") {
			t.Fatalf("%s: conformance failed (exit %v):\n%s", phase, err, out)
		}
		t.Logf("%s: OCI Conformance Result: Pass", phase)
	}
	run("cold")
	run("warm")
	up.SetDown(true)
	run("upstream down")
}
