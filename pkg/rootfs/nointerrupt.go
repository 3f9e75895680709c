package rootfs

import (
	"unsafe"

	_ "github.com/hanwen/go-fuse/v2/fuse" // operationHandlers below
)

// FUSE INTERRUPT: a process waiting on a FUSE request that gets a signal
// makes the kernel send INTERRUPT for it. runc's init (a Go program: the
// runtime preempts goroutines with SIGURG) gets such signals during the
// container's first lookups and execve. go-fuse answers an INTERRUPT
// whose request it has read but not yet registered (another reader
// thread holds it) with EAGAIN, and the kernel requeues the INTERRUPT at
// once: a busy loop between kernel and server until the request is
// registered. A container start's debug log showed 2,000 such INTERRUPTs
// around the exec of one binary, on a loaded 2-core node where the thread
// holding the request could not run.
//
// Nothing in this filesystem honours interrupts (every request is short
// and local), so the server answers INTERRUPT with ENOSYS, which makes
// the kernel stop sending them on that connection (fc->no_interrupt):
// requests then wait killable (SIGKILL still ends a process stuck on a
// dead server; aborting the connection ends the rest). go-fuse v2.12.1
// has no option for it: its handler table entry is cleared instead
// (an opcode without handler is answered ENOSYS).

//go:linkname fuseOperationHandlers github.com/hanwen/go-fuse/v2/fuse.operationHandlers
var fuseOperationHandlers []*fuseOperationHandler

// fuseOperationHandler mirrors go-fuse v2.12.1's fuse.operationHandler;
// disableInterrupts checks the entry it changes before changing it.
type fuseOperationHandler struct {
	OpCode        int
	Name          string
	Func          unsafe.Pointer // operationFunc
	InputSize     uintptr
	OutputSize    uintptr
	InType        any
	OutType       any
	FileNames     int
	FileNameOut   bool
	SuppressReply bool
}

// fuseOpInterrupt is FUSE_INTERRUPT.
const fuseOpInterrupt = 36

// interruptsDisabled tells whether the INTERRUPT handler was cleared.
var interruptsDisabled = disableInterrupts()

func disableInterrupts() bool {
	if len(fuseOperationHandlers) <= fuseOpInterrupt {
		return false
	}
	h := fuseOperationHandlers[fuseOpInterrupt]
	if h == nil || h.OpCode != fuseOpInterrupt || h.Name != "INTERRUPT" || h.Func == nil {
		return false
	}
	h.Func = nil
	return true
}
