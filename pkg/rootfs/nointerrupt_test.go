package rootfs

import "testing"

// The INTERRUPT handler of go-fuse's table is cleared (nointerrupt.go);
// this fails when a go-fuse upgrade changes the table's layout.
func TestInterruptsDisabled(t *testing.T) {
	if !interruptsDisabled {
		t.Fatal("go-fuse's INTERRUPT handler was not cleared: check fuseOperationHandler against the go-fuse version")
	}
	if h := fuseOperationHandlers[fuseOpInterrupt]; h.Func != nil || h.Name != "INTERRUPT" {
		t.Fatalf("INTERRUPT handler %+v", h)
	}
	if h := fuseOperationHandlers[1]; h.Name != "LOOKUP" || h.Func == nil {
		t.Fatalf("LOOKUP handler %+v: the mirrored layout is wrong", h)
	}
}
