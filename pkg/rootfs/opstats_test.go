package rootfs

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestOpStatsPublished checks that a server counts the requests it answers
// and publishes them where the daemon looks (StatsPath).
func TestOpStatsPublished(t *testing.T) {
	needRoot(t)
	old := statsInterval
	statsInterval = 100 * time.Millisecond
	t.Cleanup(func() { statsInterval = old })

	e := newEnv(t)
	layers := baseLayers(t, e)
	mp := filepath.Join(e.dir, "stats", "rootfs")
	serve(t, Config{Mountpoint: mp, CASRoot: e.cas.Root(), ManifestRoot: filepath.Join(e.dir, "manifests"), Layers: layers, ReadOnly: true})

	if _, err := os.ReadFile(filepath.Join(mp, "etc/passwd")); err != nil {
		t.Fatal(err)
	}
	if _, err := os.ReadDir(filepath.Join(mp, "etc")); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		st, err := ReadStats(mp)
		if err == nil && st.Ops["lookup"].Count > 0 && st.Ops["open"].Count > 0 && st.Ops["readdir"].Count > 0 {
			if st.PID != os.Getpid() {
				t.Errorf("stats pid = %d, want this process %d", st.PID, os.Getpid())
			}
			lk := st.Ops["lookup"]
			if n := len(lk.Buckets); n != numBuckets || lk.Buckets[n-1] > lk.Count {
				t.Errorf("lookup buckets %v inconsistent with count %d", lk.Buckets, lk.Count)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("stats never showed lookup/open/readdir: %+v, %v", st, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
