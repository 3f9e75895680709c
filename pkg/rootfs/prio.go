package rootfs

import (
	"os"
	"runtime"
	"strconv"

	"golang.org/x/sys/unix"
)

// Background priority: what the rootfs machinery does after a container's
// rootfs is up (the next spare server's exec and preload, refilling the
// region pool, writing the tree cache, deleting a removed snapshot) used
// to run at the same priority as the container start it follows, and on
// a 2-core node it took CPU from runc, the shim and the container's first
// exec. Such work now runs at nice backgroundNice: it still gets idle CPU
// at once and finishes under load (nice 19 is not SCHED_IDLE), but a
// container start goes first.

// backgroundNice is the nice value of background work.
const backgroundNice = 19

// lowerThread locks the calling goroutine to its OS thread and lowers
// that thread's priority. The goroutine must not unlock: the thread then
// exits with the goroutine instead of going back to the pool niced.
// Processes forked from it (a spare server) start at that priority too.
func lowerThread() {
	runtime.LockOSThread()
	_ = unix.Setpriority(unix.PRIO_PROCESS, unix.Gettid(), backgroundNice)
}

// idleThread is lowerThread with SCHED_IDLE: a task of a normal class
// that wakes up preempts it at once, where a nice 19 task may keep the
// CPU to the end of its slice (EEVDF), which delayed the wakeups of a
// container start's processes. For the spare server, which
// restorePriorityOf lifts when it is needed: under sustained load a
// SCHED_IDLE task gets next to no CPU.
func idleThread() {
	lowerThread()
	_ = unix.SchedSetAttr(0, &unix.SchedAttr{Size: unix.SizeofSchedAttr, Policy: unix.SCHED_IDLE, Nice: backgroundNice}, 0)
}

// InIdle runs fn in a new goroutine on its own SCHED_IDLE thread.
func InIdle(fn func()) {
	go func() {
		idleThread()
		fn()
	}()
}

// InBackground runs fn in a new goroutine on its own niced thread.
func InBackground(fn func()) {
	go func() {
		lowerThread()
		fn()
	}()
}

// RunInBackground runs fn on a niced thread and waits for it.
func RunInBackground(fn func()) {
	done := make(chan struct{})
	InBackground(func() {
		defer close(done)
		fn()
	})
	<-done
}

// restorePriority gives every thread of this process nice 0 back: a spare
// server is started niced (it waits in the background) and becomes the
// server of a starting container on assignment. Linux keeps nice per
// thread; a thread created while this runs inherits its creator's value,
// so the loop goes twice. Errors are ignored (without CAP_SYS_NICE the
// server just stays niced).
func restorePriority() {
	// Start restored it already (the usual case): no /proc walk.
	if a, err := unix.SchedGetAttr(0, 0); err == nil && a.Policy == unix.SCHED_NORMAL && a.Nice == 0 {
		return
	}
	restorePriorityOf("self")
}

// restorePriorityOf is restorePriority for process pid ("self" or a
// number). Start calls it on a spare before waking it with its
// assignment: a niced thread that wakes on a busy node may wait long for
// a CPU.
func restorePriorityOf(pid string) {
	for range 2 {
		des, err := os.ReadDir("/proc/" + pid + "/task")
		if err != nil {
			return
		}
		for _, de := range des {
			if tid, err := strconv.Atoi(de.Name()); err == nil {
				// SCHED_NORMAL at nice 0 (also leaves SCHED_IDLE).
				if unix.SchedSetAttr(tid, &unix.SchedAttr{Size: unix.SizeofSchedAttr, Policy: unix.SCHED_NORMAL}, 0) != nil {
					_ = unix.Setpriority(unix.PRIO_PROCESS, tid, 0)
				}
			}
		}
	}
}

// threadNice is the nice value of thread tid.
func threadNice(tid int) (int, error) {
	// getpriority(2) returns 20-nice.
	p, err := unix.Getpriority(unix.PRIO_PROCESS, tid)
	if err != nil {
		return 0, err
	}
	return 20 - p, nil
}
