package rootfs

import (
	"bufio"
	"errors"
	"io"
	"os"
	"os/exec"
	"sync"
)

// The refresher's lookups run in a child process of the server, never in
// the server itself: a process that is a client of its own mount cannot
// die cleanly. A SIGKILL landing while one of its threads waits for an
// answer the server had already read leaves that thread waiting
// uninterruptibly (request_wait_answer waits out a request in userspace)
// for an answer only the dying process could give; its last thread never
// exits, /dev/fuse is never closed, the connection never aborted, and the
// dead server keeps the mount and the region lock (TestCrashFsync caught
// it). A child's pending lookup instead ends with ENOTCONN as soon as the
// server is gone and its connection aborted; the child then reads EOF on
// its stdin and exits.
//
// The child is the server's own binary, re-executed with
// refreshChildEnv=MOUNTPOINT: this package's init serves it before main
// runs. Protocol: the server writes a path (relative to the mount) ending
// in NUL (names cannot hold one); the child fstat's it beneath the mount
// (statBeneath) and answers one byte, 'k' or 'e'.
const refreshChildEnv = "DUPSNAP_ROOTFS_REFRESH_CHILD"

func init() {
	if m := os.Getenv(refreshChildEnv); m != "" {
		os.Exit(runRefreshChild(m, os.Stdin, os.Stdout))
	}
}

func runRefreshChild(mount string, in io.Reader, out io.Writer) int {
	r := bufio.NewReader(in)
	for {
		p, err := r.ReadString(0)
		if err != nil {
			return 0 // the server is gone (or done)
		}
		ans := []byte{'k'}
		if statBeneath(mount, p[:len(p)-1]) != nil {
			ans[0] = 'e'
		}
		if _, err := out.Write(ans); err != nil {
			return 0
		}
	}
}

// refreshChild is the server's side of the child.
type refreshChild struct {
	mount string
	mu    sync.Mutex
	cmd   *exec.Cmd
	in    io.WriteCloser
	out   *bufio.Reader
	dead  bool // could not start, or broke: no more refreshes
}

var errRefreshChild = errors.New("rootfs: attribute refresher child unavailable")

// stat has the child fstat path p of the mount.
func (c *refreshChild) stat(p string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.dead {
		return errRefreshChild
	}
	if c.cmd == nil {
		if err := c.start(); err != nil {
			c.dead = true
			return err
		}
	}
	if _, err := io.WriteString(c.in, p+"\x00"); err != nil {
		c.kill()
		return err
	}
	b, err := c.out.ReadByte()
	if err != nil {
		c.kill()
		return err
	}
	if b != 'k' {
		return errRefreshChild
	}
	return nil
}

func (c *refreshChild) start() error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	cmd := exec.Command(self)
	cmd.Env = append(os.Environ(), refreshChildEnv+"="+c.mount)
	in, err := cmd.StdinPipe()
	if err != nil {
		return err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	c.cmd, c.in, c.out = cmd, in, bufio.NewReader(out)
	return nil
}

func (c *refreshChild) kill() {
	c.dead = true
	if c.cmd != nil {
		c.in.Close()
		c.cmd.Process.Kill()
		go c.cmd.Wait()
	}
}

// close ends the child (the server stops).
func (c *refreshChild) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cmd != nil && !c.dead {
		c.in.Close() // EOF: it exits
		go c.cmd.Wait()
	}
	c.dead = true
}
