// Package stack runs dupsnap's whole system outside `go test`, for
// `make demo` and `make bench`: a registry tier (distribution registry +
// dupproxy, each behind a byte-counting forwarder), nodes (private
// containerd + dupsnap), the demo image set, pulls, runs and disk usage.
// It drives integration/harness, whose helpers take a testing.TB; T is
// that TB for a program.
package stack

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/dupsnap/dupsnap/integration/harness"
)

// abort is what Fatal and Skip panic with; Do recovers it.
type abort struct {
	msg  string
	skip bool
}

// ErrSkipped wraps the reason a step was skipped (component not ready).
var ErrSkipped = errors.New("skipped")

// T implements testing.TB for programs: Fatal and Skip unwind to the
// nearest Do, Cleanup functions run last-in first-out when Close is called.
type T struct {
	testing.TB // nil: only satisfies the interface's unexported method
	name       string
	ctx        context.Context
	out        io.Writer
	mu         sync.Mutex
	cleanups   []func()
	failed     bool
	skipped    bool
}

// NewT returns a root T that logs to out.
func NewT(ctx context.Context, name string, out io.Writer) *T {
	return &T{name: name, ctx: ctx, out: out}
}

func (t *T) Cleanup(f func()) { t.mu.Lock(); t.cleanups = append(t.cleanups, f); t.mu.Unlock() }
func (t *T) Helper()          {}
func (t *T) Name() string     { return t.name }
func (t *T) Context() context.Context {
	return t.ctx
}
func (t *T) Log(args ...any)                 { fmt.Fprintln(t.out, args...) }
func (t *T) Logf(format string, args ...any) { fmt.Fprintf(t.out, format+"\n", args...) }
func (t *T) Error(args ...any)               { t.Log(args...); t.Fail() }
func (t *T) Errorf(format string, args ...any) {
	t.Logf(format, args...)
	t.Fail()
}
func (t *T) Fail()         { t.mu.Lock(); t.failed = true; t.mu.Unlock() }
func (t *T) Failed() bool  { t.mu.Lock(); defer t.mu.Unlock(); return t.failed }
func (t *T) Skipped() bool { return t.skipped }
func (t *T) FailNow()      { t.Fail(); panic(abort{msg: "failed"}) }
func (t *T) Fatal(args ...any) {
	t.Fail()
	panic(abort{msg: strings.TrimSpace(fmt.Sprintln(args...))})
}
func (t *T) Fatalf(format string, args ...any) {
	t.Fail()
	panic(abort{msg: fmt.Sprintf(format, args...)})
}
func (t *T) SkipNow() { t.skipped = true; panic(abort{msg: "skipped", skip: true}) }
func (t *T) Skip(args ...any) {
	t.skipped = true
	panic(abort{msg: strings.TrimSpace(fmt.Sprintln(args...)), skip: true})
}
func (t *T) Skipf(format string, args ...any) {
	t.skipped = true
	panic(abort{msg: fmt.Sprintf(format, args...), skip: true})
}
func (t *T) Setenv(k, v string) {
	old, had := os.LookupEnv(k)
	os.Setenv(k, v)
	t.Cleanup(func() {
		if had {
			os.Setenv(k, old)
		} else {
			os.Unsetenv(k)
		}
	})
}
func (t *T) TempDir() string {
	d, err := os.MkdirTemp("", "dupsnap-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// Close runs the cleanups, last registered first. Safe to call twice.
func (t *T) Close() {
	for {
		t.mu.Lock()
		n := len(t.cleanups)
		if n == 0 {
			t.mu.Unlock()
			return
		}
		f := t.cleanups[n-1]
		t.cleanups = t.cleanups[:n-1]
		t.mu.Unlock()
		func() {
			defer func() {
				if r := recover(); r != nil {
					fmt.Fprintf(t.out, "cleanup: %v\n", r)
				}
			}()
			f()
		}()
	}
}

// Do runs fn with a child T whose cleanups run when fn returns. A Fatal in
// fn becomes the returned error, a Skip an error wrapping ErrSkipped; other
// panics propagate. The parent is not marked failed: the caller decides.
func Do(parent *T, name string, fn func(t *T)) (err error) {
	c := &T{name: parent.name + "/" + name, ctx: parent.ctx, out: parent.out}
	defer c.Close()
	defer func() {
		r := recover()
		if r == nil {
			return
		}
		a, ok := r.(abort)
		if !ok {
			panic(r)
		}
		if a.skip {
			err = fmt.Errorf("%w: %s", ErrSkipped, a.msg)
		} else {
			err = errors.New(a.msg)
		}
	}()
	fn(c)
	if c.Failed() {
		return fmt.Errorf("%s: failed (see log)", name)
	}
	return nil
}

// Check calls t.Fatal with err (prefixed by what) when err is not nil.
func Check(t testing.TB, err error, what string) {
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// SignalContext is cancelled on SIGINT or SIGTERM: every wait and command
// of the stack takes it, so the program unwinds and runs its cleanups. If
// unwinding takes longer than grace, emergency cleans top (processes,
// mounts, files) and the program exits 130 anyway.
func SignalContext(top func() string, grace time.Duration) (context.Context, func()) {
	ctx, cancel := context.WithCancel(context.Background())
	ch := make(chan os.Signal, 2)
	signal.Notify(ch, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		s, ok := <-ch
		if !ok {
			return
		}
		fmt.Fprintf(os.Stderr, "\n%v: stopping, cleaning up (press again to force)\n", s)
		cancel()
		select {
		case <-ch:
		case <-time.After(grace):
		}
		if d := top(); d != "" {
			Emergency(d)
		}
		os.Exit(130)
	}()
	return ctx, func() { signal.Stop(ch); cancel() }
}

// Emergency tears down everything under dir without a T: processes
// mentioning it, its mounts (FUSE aborted if need be), then the files.
func Emergency(dir string) error {
	harness.UnmountUnder(dir)
	harness.KillMentioning(dir)
	if err := harness.UnmountUnder(dir); err != nil {
		return err
	}
	return os.RemoveAll(dir)
}

// Try runs fn on t itself (cleanups stay registered on t) and turns a
// Fatal or Skip in fn into the returned error, so that a component that is
// not ready degrades the run instead of ending it.
func Try(t *T, fn func()) (err error) {
	defer func() {
		r := recover()
		if r == nil {
			return
		}
		a, ok := r.(abort)
		if !ok {
			panic(r)
		}
		t.mu.Lock()
		t.failed, t.skipped = false, false
		t.mu.Unlock()
		if a.skip {
			err = fmt.Errorf("%w: %s", ErrSkipped, a.msg)
		} else {
			err = errors.New(a.msg)
		}
	}()
	fn()
	return nil
}
