package rootfs

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// detachPinned takes a mount out at once, pinned unless in use.
func TestDetachPinned(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (mounts)")
	}
	mp := t.TempDir()
	mount := func() {
		t.Helper()
		if err := unix.Mount("tmpfs", mp, "tmpfs", 0, "size=1m"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Unmount(mp, unix.MNT_DETACH) })
	}
	mounted := func() bool { _, ok := findMount(mp); return ok }

	mount()
	if err := os.WriteFile(filepath.Join(mp, "f"), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	pin, busy, err := detachPinned(mp)
	if err != nil || busy || pin < 0 {
		t.Fatalf("idle mount: pin %d busy %v err %v", pin, busy, err)
	}
	if mounted() {
		t.Fatal("still in mountinfo after detachPinned")
	}
	// The pin still reaches the detached fs until closed.
	var st unix.Statfs_t
	if err := unix.Fstatfs(pin, &st); err != nil || st.Type != unix.TMPFS_MAGIC {
		t.Fatalf("pin does not hold the tmpfs: type %x err %v", st.Type, err)
	}
	unix.Close(pin)

	mount()
	f, err := os.Create(filepath.Join(mp, "open"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	pin, busy, err = detachPinned(mp)
	if err != nil || !busy || pin != -1 {
		t.Fatalf("busy mount: pin %d busy %v err %v", pin, busy, err)
	}
	if mounted() {
		t.Fatal("busy mount not detached")
	}
}

// lowerThread nices only the thread it locks; restorePriority gives the
// process's threads nice 0 back.
func TestBackgroundPriority(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (raising a nice value)")
	}
	got := make(chan int, 1)
	RunInBackground(func() {
		n, err := threadNice(unix.Gettid())
		if err != nil {
			t.Error(err)
		}
		got <- n
	})
	if n := <-got; n != backgroundNice {
		t.Fatalf("background thread nice %d, want %d", n, backgroundNice)
	}
	if n, _ := threadNice(unix.Gettid()); n != 0 {
		t.Fatalf("caller's thread niced too: %d", n)
	}
	// Niced and SCHED_IDLE threads of this process are raised again.
	done := make(chan struct{})
	defer close(done)
	tidc := make(chan int, 2)
	InBackground(func() { tidc <- unix.Gettid(); <-done })
	InIdle(func() { tidc <- unix.Gettid(); <-done })
	tids := []int{<-tidc, <-tidc}
	idle := 0
	for _, tid := range tids {
		if a, err := unix.SchedGetAttr(tid, 0); err == nil && a.Policy == unix.SCHED_IDLE {
			idle++
		}
	}
	if idle != 1 {
		t.Fatalf("%d SCHED_IDLE threads, want 1 (InIdle's)", idle)
	}
	restorePriorityOf("self")
	for _, tid := range tids {
		a, err := unix.SchedGetAttr(tid, 0)
		if err != nil || a.Policy != unix.SCHED_NORMAL || a.Nice != 0 {
			t.Fatalf("thread %d after restorePriority: %+v %v", tid, a, err)
		}
	}
}
