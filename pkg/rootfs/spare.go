package rootfs

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/dupsnap/dupsnap/pkg/cas"
	"github.com/dupsnap/dupsnap/pkg/layout"
)

// A spare server: exec and Go runtime start of a server process cost a
// container start 4-13 ms on a busy 2-core node, so StartSpare keeps one
// server process of the small binary started ahead, blocked on a pipe.
// Start hands it the config path (and log file) through that pipe and it
// goes on exactly like a freshly started server; a new spare is started
// once the handed-over server is ready. A spare whose daemon dies reads
// EOF and exits; it holds nothing else.

// AssignFDEnv names the inherited fd of a spare's assignment pipe.
const AssignFDEnv = "DUPSNAP_ROOTFS_ASSIGN_FD"

// serverProc is a started server process as Start sees it.
type serverProc struct {
	cmd    *exec.Cmd
	ready  *os.File // read end of the ready pipe
	assign *os.File // write end of the assignment pipe (spares only)
	exited chan struct{}
	// preload: the chain a spare preloads (PreloadEnv).
	preload []digest.Digest
}

var spares = struct {
	sync.Mutex
	byBinary map[string]*serverProc
	starting map[string]bool
}{byBinary: map[string]*serverProc{}, starting: map[string]bool{}}

// spawn starts binary as a server: with --config cfgPath and its output
// in logf, or, for a spare (cfgPath ""), waiting for its assignment; a
// spare's command line names owner (the store it will serve), so that
// operators and cleanup code can tell whose process it is.
func spawn(binary, cfgPath, owner string, logf *os.File, env ...string) (*serverProc, error) {
	rp, wp, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("rootfs: ready pipe: %w", err)
	}
	defer wp.Close() // the server holds the only write end: its exit is EOF
	p := &serverProc{ready: rp, exited: make(chan struct{})}
	args := []string{"rootfs", "--config", cfgPath}
	files := []*os.File{wp} // fd 3 in the server
	env = append(env, readyFDEnv+"=3")
	if cfgPath == "" {
		ar, aw, err := os.Pipe()
		if err != nil {
			rp.Close()
			return nil, fmt.Errorf("rootfs: assignment pipe: %w", err)
		}
		defer ar.Close()
		p.assign = aw
		args = []string{"rootfs", "--spare", "--for", owner}
		files = append(files, ar) // fd 4
		env = append(env, AssignFDEnv+"=4")
	}
	cmd := exec.Command(binary, args...)
	if logf != nil {
		cmd.Stdout, cmd.Stderr = logf, logf // stdin stays /dev/null
	}
	cmd.ExtraFiles = files
	cmd.Env = append(os.Environ(), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		rp.Close()
		if p.assign != nil {
			p.assign.Close()
		}
		return nil, fmt.Errorf("rootfs: start %s: %w", binary, err)
	}
	p.cmd = cmd
	go func() { cmd.Wait(); close(p.exited) }() // reap it if it dies while we live
	return p, nil
}

// takeSpare returns the live spare of binary, if there is one.
func takeSpare(binary string) *serverProc {
	spares.Lock()
	defer spares.Unlock()
	p := spares.byBinary[binary]
	delete(spares.byBinary, binary)
	if p == nil {
		return nil
	}
	select {
	case <-p.exited:
		p.ready.Close()
		p.assign.Close()
		return nil
	default:
		return p
	}
}

// refillSpare starts a spare of binary unless one is there or starting;
// it preloads the chain of last (the rootfs just started).
func refillSpare(binary string, last Config) {
	spares.Lock()
	if spares.byBinary[binary] != nil || spares.starting[binary] {
		spares.Unlock()
		return
	}
	spares.starting[binary] = true
	spares.Unlock()
	var env []string
	if e := preloadEnv(last); e != "" {
		env = append(env, e)
	}
	p, err := spawn(binary, "", last.CASRoot, nil, env...)
	spares.Lock()
	defer spares.Unlock()
	delete(spares.starting, binary)
	if err == nil {
		p.preload = slices.Clone(last.Layers)
		spares.byBinary[binary] = p
	}
}

// PrepareSpare makes the spare server of binary (dupsnap; see
// ServerBinary) one that preloaded the chain of cfg (only CASRoot,
// ManifestRoot and Layers matter), replacing a spare of another chain:
// the daemon calls it once an image's tree is built after a pull, so
// that the first container of the image just pulled, the likeliest to
// start next, starts on a preloaded spare too (otherwise only the
// containers after it do). Niced, in the background.
func PrepareSpare(binary string, cfg Config) {
	binary = ServerBinary(binary)
	if filepath.Base(binary) != SmallBinary {
		return
	}
	spares.Lock()
	old := spares.byBinary[binary]
	if old != nil && slices.Equal(old.preload, cfg.Layers) || spares.starting[binary] {
		spares.Unlock()
		return
	}
	delete(spares.byBinary, binary)
	spares.Unlock()
	if old != nil {
		// EOF on its assignment pipe: the old spare exits.
		old.assign.Close()
		old.ready.Close()
	}
	InIdle(func() { refillSpare(binary, cfg) })
}

// assign hands a spare its config and log file; from here on it is the
// server of that config.
func (p *serverProc) assignTo(cfgPath, logFile string) error {
	defer func() { p.assign.Close(); p.assign = nil }()
	restorePriorityOf(strconv.Itoa(p.cmd.Process.Pid))
	// The third line, when Start handed it over, times the handoff.
	_, err := p.assign.Write([]byte(cfgPath + "\n" + logFile + "\n" + strconv.FormatInt(time.Now().UnixNano(), 10) + "\n"))
	return err
}

// assignedAt is when Start handed this spare its assignment (zero: not a
// spare, or an assignment without the time).
var assignedAt time.Time

// assignReadAt is when this spare read it (the handoff's wakeup).
var assignReadAt time.Time

// AwaitAssignment is what a spare server (`rootfs --spare`) runs first: it
// blocks until Start hands it a config, sends its output to that rootfs's
// log file, and returns the config path. ok is false if the daemon went
// away instead: the spare just exits.
func AwaitAssignment() (cfgPath string, ok bool, err error) {
	v := os.Getenv(AssignFDEnv)
	os.Unsetenv(AssignFDEnv)
	fd, err := strconv.Atoi(v)
	if err != nil || fd < 3 {
		return "", false, fmt.Errorf("rootfs: --spare without an assignment pipe")
	}
	f := os.NewFile(uintptr(fd), "assign")
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, 2*unix.PathMax+2))
	if err != nil {
		return "", false, fmt.Errorf("rootfs: read assignment: %w", err)
	}
	lines := bytes.Split(bytes.TrimSuffix(b, []byte("\n")), []byte("\n"))
	if len(b) == 0 {
		return "", false, nil
	}
	// Started niced (in the background); from here on a container waits.
	restorePriority()
	if len(lines) < 2 || len(lines) > 3 || !filepath.IsAbs(string(lines[0])) || !filepath.IsAbs(string(lines[1])) {
		return "", false, errors.New("rootfs: bad assignment")
	}
	if len(lines) == 3 {
		if ns, err := strconv.ParseInt(string(lines[2]), 10, 64); err == nil {
			assignedAt = time.Unix(0, ns)
			assignReadAt = time.Now()
		}
	}
	logf, err := os.OpenFile(string(lines[1]), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return "", false, fmt.Errorf("rootfs: log file: %w", err)
	}
	defer logf.Close()
	for _, out := range []int{1, 2} {
		if err := unix.Dup3(int(logf.Fd()), out, 0); err != nil {
			return "", false, fmt.Errorf("rootfs: log file: %w", err)
		}
	}
	return string(lines[0]), true, nil
}

// PreloadEnv carries, to a spare, the config (JSON; only cas_root,
// manifest_root, layers and debug matter) of the rootfs started just before it:
// the next one is likely of the same image (a restarted or scaled-out
// container), so the spare opens the stores and decodes that chain's
// cached tree while it waits.
const PreloadEnv = "DUPSNAP_ROOTFS_PRELOAD"

// Preloaded is what a spare prepared for the chain it expects.
type Preloaded struct {
	casRoot, manifestRoot string
	layers                []digest.Digest
	store                 *cas.Store
	ms                    *layout.Store
	tree                  *layout.Tree
	// links is the tree's hardlink index (newRootFS's whole-tree walk,
	// 1.2-2.6 ms for an image of ~6000 entries), built while waiting.
	links map[*layout.Node][]string
	// pm is the tree mounted ahead (premount.go), nil if that failed.
	pm *premount
}

// Preload prepares what $PreloadEnv names; nil if nothing (no hint, no
// cached tree, an error: the spare then loads at assignment as usual).
func Preload() *Preloaded {
	v := os.Getenv(PreloadEnv)
	os.Unsetenv(PreloadEnv)
	if v == "" {
		return nil
	}
	var c Config
	if json.Unmarshal([]byte(v), &c) != nil || c.CASRoot == "" || c.ManifestRoot == "" {
		return nil
	}
	tree := loadTreeCache(c.ManifestRoot, c.Layers)
	if tree == nil {
		return nil
	}
	store, err := cas.Open(c.CASRoot, cas.Options{})
	if err != nil {
		return nil
	}
	ms, err := layout.OpenStore(c.ManifestRoot, store)
	if err != nil {
		store.Close()
		return nil
	}
	fixRoot(tree)
	links := linkIndex(tree)
	pm, _ := premountTree(tree, c.Debug) // nil: mounted at assignment as usual
	debug.FreeOSMemory()                 // idle until assigned: keep only the tree
	return &Preloaded{casRoot: c.CASRoot, manifestRoot: c.ManifestRoot, layers: c.Layers, store: store, ms: ms, tree: tree, links: links, pm: pm}
}

// take returns the preloaded tree, its link index, store and premount
// (if it fits cfg) if they are cfg's (its layers still on the node);
// otherwise it releases them and returns nil.
func (p *Preloaded) take(cfg Config) (*layout.Tree, map[*layout.Node][]string, *cas.Store, *premount) {
	if p == nil {
		return nil, nil, nil, nil
	}
	if p.casRoot == cfg.CASRoot && p.manifestRoot == cfg.ManifestRoot && slices.Equal(p.layers, cfg.Layers) {
		ok := true
		for _, d := range cfg.Layers {
			ok = ok && p.ms.Has(d)
		}
		if ok {
			if !p.pm.fits(cfg) {
				p.pm.discard()
				p.pm = nil
			}
			return p.tree, p.links, p.store, p.pm
		}
	}
	p.pm.discard()
	p.store.Close()
	return nil, nil, nil, nil
}

// preloadEnv is the PreloadEnv value for a spare started after cfg.
func preloadEnv(cfg Config) string {
	b, err := json.Marshal(Config{CASRoot: cfg.CASRoot, ManifestRoot: cfg.ManifestRoot, Layers: cfg.Layers, Debug: cfg.Debug})
	if err != nil {
		return ""
	}
	return PreloadEnv + "=" + string(b)
}
