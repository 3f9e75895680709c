package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// runApp runs dupsnap with args, capturing stdout in a file.
func runApp(t *testing.T, args ...string) (int, string) {
	t.Helper()
	f, err := os.CreateTemp(t.TempDir(), "stdout")
	if err != nil {
		t.Fatal(err)
	}
	old := os.Stdout
	os.Stdout = f
	code := app.Run(args)
	os.Stdout = old
	f.Close()
	b, _ := os.ReadFile(f.Name())
	return code, string(b)
}

func testLayer(t *testing.T, files map[string]string) []byte {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, name := range []string{"a", "b", "c"} {
		data, ok := files[name]
		if !ok {
			continue
		}
		tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(data)), Typeflag: tar.TypeReg})
		tw.Write([]byte(data))
	}
	tw.Close()
	return buf.Bytes()
}

func TestStoreCLI(t *testing.T) {
	dir := t.TempDir()
	root := filepath.Join(dir, "root")
	shared := strings.Repeat("shared content ", 10000)
	l1 := testLayer(t, map[string]string{"a": shared, "b": "one"})
	l2 := testLayer(t, map[string]string{"a": shared, "c": "three!"})
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write(l2)
	zw.Close()
	os.WriteFile(filepath.Join(dir, "l1.tar"), l1, 0o600)
	os.WriteFile(filepath.Join(dir, "l2.tar.gz"), gz.Bytes(), 0o600)

	code, out := runApp(t, "store", "import-layer", "--root", root, filepath.Join(dir, "l1.tar"), filepath.Join(dir, "l2.tar.gz"))
	if code != 0 {
		t.Fatalf("import exit %d", code)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 2 {
		t.Fatalf("want 2 JSON lines, got %q", out)
	}
	var r [2]struct {
		DiffID   string `json:"diff_id"`
		Files    int    `json:"files"`
		Bytes    int64  `json:"bytes"`
		NewBytes int64  `json:"new_bytes"`
	}
	for i, l := range lines {
		if err := json.Unmarshal([]byte(l), &r[i]); err != nil {
			t.Fatal(err)
		}
	}
	sum := sha256.Sum256(l2)
	if r[1].DiffID != "sha256:"+hex.EncodeToString(sum[:]) || r[1].Files != 2 || r[1].Bytes != int64(len(shared)+6) {
		t.Fatalf("layer 2 line: %+v", r[1])
	}
	if r[0].NewBytes != int64(len(shared)+3) || r[1].NewBytes != 6 {
		t.Fatalf("new_bytes %d, %d: shared file not deduplicated", r[0].NewBytes, r[1].NewBytes)
	}

	code, out = runApp(t, "store", "export-layer", "--root", root, r[1].DiffID)
	if code != 0 || out != string(l2) {
		t.Fatalf("export exit %d, %d bytes", code, len(out))
	}

	code, out = runApp(t, "store", "stats", "--root", root, "--json")
	var st struct {
		Layers        int     `json:"layers"`
		Objects       int     `json:"objects"`
		LogicalBytes  int64   `json:"logical_bytes"`
		PhysicalBytes int64   `json:"physical_bytes"`
		DedupRatio    float64 `json:"dedup_ratio"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil || code != 0 {
		t.Fatalf("stats: %d %v %q", code, err, out)
	}
	if st.Layers != 2 || st.Objects != 3 || st.LogicalBytes != int64(2*len(shared)+9) || st.DedupRatio < 1.9 {
		t.Fatalf("stats %+v", st)
	}

	if code, out = runApp(t, "store", "fsck", "--root", root, "--export"); code != 0 {
		t.Fatalf("fsck of a good store: %d\n%s", code, out)
	}
	// Damage one object: fsck must fail.
	var obj string
	filepath.Walk(filepath.Join(root, "cas"), func(p string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() && fi.Size() == int64(len(shared)) {
			obj = p
		}
		return nil
	})
	if obj == "" {
		t.Fatal("object not found on disk")
	}
	os.Chmod(obj, 0o644)
	os.WriteFile(obj, []byte(strings.Repeat("X", len(shared))), 0o444)
	if code, out = runApp(t, "store", "fsck", "--root", root); code == 0 {
		t.Fatalf("fsck of a damaged store exited 0:\n%s", out)
	}
	if code, _ = runApp(t, "store", "gc", "--root", root, "--grace", "0s"); code != 0 {
		t.Fatalf("gc exit %d", code)
	}
	if code, _ = runApp(t, "store", "nope"); code != 2 {
		t.Fatalf("unknown operation exit %d", code)
	}
}
