// Package phases times the steps of one operation for a log line
// ("open=170µs cached=60µs state=1.9ms").
package phases

import (
	"fmt"
	"strings"
	"time"
)

// Timer accumulates named steps; each Mark ends the step that began at
// the previous Mark (or at the start time).
type Timer struct {
	last time.Time
	b    strings.Builder
}

// Start returns a timer whose first step began at t.
func Start(t time.Time) *Timer { return &Timer{last: t} }

// Mark ends the current step, naming it.
func (ph *Timer) Mark(name string) {
	now := time.Now()
	if ph.b.Len() > 0 {
		ph.b.WriteByte(' ')
	}
	fmt.Fprintf(&ph.b, "%s=%s", name, now.Sub(ph.last).Round(10*time.Microsecond))
	ph.last = now
}

func (ph *Timer) String() string { return ph.b.String() }
