package rootfs

import (
	"bytes"
	"context"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// crashBlock is one slot's content: its writer's tag repeated.
func crashBlock(file string, seq int) []byte {
	tag := fmt.Sprintf("<%s:%08d>", file, seq)
	return []byte(strings.Repeat(tag, 4096/len(tag)+1)[:4096])
}

// parseTag returns the file and seq a slot holds, ok=false for data that
// is no writer's (base or zeros).
func parseTag(b []byte) (string, int, bool) {
	if len(b) == 0 || b[0] != '<' {
		return "", 0, false
	}
	i := bytes.IndexByte(b, '>')
	if i < 0 {
		return "", 0, false
	}
	var seq int
	f := string(b[1:i])
	j := strings.LastIndexByte(f, ':')
	if j < 0 {
		return "", 0, false
	}
	fmt.Sscanf(f[j+1:], "%d", &seq)
	if !bytes.Equal(b, crashBlock(f[:j], seq)) {
		return f[:j], -1, true // torn or mixed block
	}
	return f[:j], seq, true
}

// TestCrashFsync kills -9 the rootfs server (a real `dupsnap rootfs`
// subprocess) while a writer does pwrite+fsync on image and new files and
// create/write/unlink cycles; after Stop+Start every fsync'd write is
// there and no slot holds another file's data.
func TestCrashFsync(t *testing.T) {
	needRoot(t)
	bin := dupsnapBin(t)
	e, layers, body := bigImage(t, 1<<20)
	cfg := activeCfg(e, layers)
	os.MkdirAll(cfg.Mountpoint, 0o755)
	mp := cfg.Mountpoint
	logFile := filepath.Join(e.dir, "rootfs.log")
	start := func() int { return startServer(t, bin, cfg, logFile) }
	stop := func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		Stop(ctx, mp)
		forceUnmount(mp)
	}
	const slots = 64
	files := []string{"big", "n0", "n1"}
	// synced[file][slot] = seq of the last write fsync'd; tried = every seq
	// attempted per slot (an unsynced later write may or may not be there).
	synced := map[string]map[int]int{}
	tried := map[string]map[int]map[int]bool{}
	for _, f := range files {
		synced[f], tried[f] = map[int]int{}, map[int]map[int]bool{}
	}
	rng := rand.New(rand.NewSource(time.Now().UnixNano()))
	seq := 0
	for round := 0; round < 4; round++ {
		pid := start()
		var stopW atomic.Bool
		done := make(chan string, 1)
		go func() {
			var err error
			defer func() { done <- fmt.Sprint(err) }()
			for !stopW.Load() {
				seq++
				s := seq
				name := files[rng.Intn(len(files))]
				slot := rng.Intn(slots)
				if rng.Intn(5) == 0 {
					// churn: a file whose freed blocks others will reuse
					p := filepath.Join(mp, fmt.Sprintf("tmp%d", s))
					if err = os.WriteFile(p, bytes.Repeat(crashBlock("tmp", s), 8), 0o644); err != nil {
						return
					}
					if err = os.Remove(p); err != nil {
						return
					}
					continue
				}
				var f *os.File
				f, err = os.OpenFile(filepath.Join(mp, name), os.O_RDWR|os.O_CREATE, 0o644)
				if err != nil {
					return
				}
				if tried[name][slot] == nil {
					tried[name][slot] = map[int]bool{}
				}
				tried[name][slot][s] = true
				_, err = f.WriteAt(crashBlock(name, s), int64(slot)*4096)
				if err == nil {
					err = f.Sync()
				}
				f.Close()
				if err != nil {
					return
				}
				if name != "big" && synced[name] != nil && len(synced[name]) == 0 {
					// a new file's name must be durable too: fsync its dir
					d, _ := os.Open(mp)
					if d != nil {
						err = d.Sync()
						d.Close()
						if err != nil {
							return
						}
					}
				}
				synced[name][slot] = s
			}
		}()
		time.Sleep(time.Duration(100+rng.Intn(300)) * time.Millisecond)
		syscall.Kill(pid, syscall.SIGKILL)
		var werr string
		select {
		case werr = <-done:
		case <-time.After(20 * time.Second):
			stopW.Store(true)
			t.Fatal("writer did not stop after the server was killed")
		}
		stop()
		t.Logf("round %d: killed at seq %d, writer: %s", round, seq, werr)
		start()
		for _, name := range files {
			b, err := os.ReadFile(filepath.Join(mp, name))
			if err != nil {
				if len(synced[name]) == 0 && os.IsNotExist(err) {
					continue
				}
				t.Fatalf("round %d: read %s: %v", round, name, err)
			}
			for slot := 0; slot < slots; slot++ {
				var blk []byte
				if (slot+1)*4096 <= len(b) {
					blk = b[slot*4096 : (slot+1)*4096]
				}
				f, s, ok := parseTag(blk)
				want, has := synced[name][slot]
				switch {
				case ok && f != name:
					t.Fatalf("round %d: %s slot %d holds %s's data", round, name, slot, f)
				case ok && s < 0:
					t.Fatalf("round %d: %s slot %d is torn", round, name, slot)
				case has && (!ok || s < want || !tried[name][slot][s]):
					t.Fatalf("round %d: %s slot %d: fsync'd seq %d lost (found %v %d)", round, name, slot, want, ok, s)
				case !ok && name == "big" && blk != nil && string(blk) != body[slot*4096:(slot+1)*4096]:
					t.Fatalf("round %d: big slot %d is neither base nor a write", round, slot)
				case ok:
					synced[name][slot] = s // an unsynced write that made it
				}
			}
		}
		stop()
	}
}
