package phases

import (
	"regexp"
	"testing"
	"time"
)

func TestMarks(t *testing.T) {
	ph := Start(time.Now().Add(-20 * time.Millisecond))
	ph.Mark("exec")
	ph.Mark("open")
	if !regexp.MustCompile(`^exec=[0-9.]+ms open=[0-9.]+[µn]?s$`).MatchString(ph.String()) {
		t.Fatalf("phases %q", ph.String())
	}
}
