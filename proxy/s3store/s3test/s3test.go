// Package s3test starts a real SeaweedFS S3 server (_tools/bin/weed, built
// by hack/install-seaweedfs.sh) for tests, on loopback, with free ports, a
// temp dir and a log file; it is killed in t.Cleanup.
package s3test

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dupsnap/dupsnap/proxy/s3store"
)

const (
	AccessKey = "dupsnaptest"
	SecretKey = "dupsnaptestsecret"
)

// Server is a running weed server with its S3 gateway.
type Server struct {
	Endpoint string
	Log      string
	cmd      *exec.Cmd
}

// WeedBin finds weed: $DUPSNAP_TOOLS/weed, <module root>/_tools/bin/weed, $PATH.
func WeedBin() string {
	if d := os.Getenv("DUPSNAP_TOOLS"); d != "" {
		if p := filepath.Join(d, "weed"); isExec(p) {
			return p
		}
	}
	if wd, err := os.Getwd(); err == nil {
		for d := wd; ; d = filepath.Dir(d) {
			if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
				if p := filepath.Join(d, "_tools", "bin", "weed"); isExec(p) {
					return p
				}
				break
			}
			if filepath.Dir(d) == d {
				break
			}
		}
	}
	if p, err := exec.LookPath("weed"); err == nil {
		return p
	}
	return ""
}

func isExec(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0
}

func freePorts(t testing.TB, n int) []int {
	var ls []net.Listener
	var ports []int
	for i := 0; i < n; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	for _, l := range ls {
		l.Close()
	}
	return ports
}

// Start runs weed server (master, volume, filer, S3) and waits until its S3
// API answers. Skips the test when weed is not built.
func Start(t testing.TB) *Server {
	t.Helper()
	bin := WeedBin()
	if bin == "" {
		t.Skip("SeaweedFS not built: run hack/install-seaweedfs.sh (builds _tools/bin/weed) to run the S3 backend tests")
	}
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	if err := os.MkdirAll(data, 0o755); err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(dir, "s3.json")
	cfg := fmt.Sprintf(`{"identities":[{"name":"dupsnap","credentials":[{"accessKey":%q,"secretKey":%q}],"actions":["Admin","Read","Write","List","Tagging"]}]}`, AccessKey, SecretKey)
	if err := os.WriteFile(conf, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	p := freePorts(t, 8)
	logPath := filepath.Join(dir, "weed.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	args := []string{"server", "-dir=" + data, "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
		"-master.port=" + strconv.Itoa(p[0]), "-master.port.grpc=" + strconv.Itoa(p[1]),
		"-volume.port=" + strconv.Itoa(p[2]), "-volume.port.grpc=" + strconv.Itoa(p[3]),
		"-filer", "-filer.port=" + strconv.Itoa(p[4]), "-filer.port.grpc=" + strconv.Itoa(p[5]),
		"-s3", "-s3.port=" + strconv.Itoa(p[6]), "-s3.port.grpc=" + strconv.Itoa(p[7]),
		"-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.config=" + conf,
		"-master.volumeSizeLimitMB=64", "-volume.max=0"}
	cmd := exec.Command(bin, args...)
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting weed: %v", err)
	}
	s := &Server{Endpoint: "http://127.0.0.1:" + strconv.Itoa(p[6]), Log: logPath, cmd: cmd}
	t.Cleanup(func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		_ = cmd.Wait()
	})
	// Ready when a bucket can be created and listed (the filer and a volume
	// must be up for that, not just the S3 port).
	b, err := s3store.Open(s.Config("ready"))
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(90 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err = b.CreateBucket(ctx)
		if err == nil {
			err = b.Put(ctx, "probe", strings.NewReader("x"), 1, nil, false)
		}
		cancel()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			tail, _ := os.ReadFile(logPath)
			if len(tail) > 4000 {
				tail = tail[len(tail)-4000:]
			}
			t.Fatalf("weed S3 not ready after 90s: %v\nlog tail:\n%s", err, tail)
		}
		time.Sleep(300 * time.Millisecond)
	}
	return s
}

// Config is a store config for a bucket on this server (not created).
func (s *Server) Config(bucket string) s3store.Config {
	return s3store.Config{Endpoint: s.Endpoint, Bucket: bucket, Region: "us-east-1",
		AccessKey: AccessKey, SecretKey: SecretKey, PathStyle: true}
}

// Bucket creates a bucket and returns its config.
func (s *Server) Bucket(t testing.TB, name string) s3store.Config {
	t.Helper()
	c := s.Config(name)
	b, err := s3store.Open(c)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := b.CreateBucket(ctx); err != nil {
		t.Fatal(err)
	}
	return c
}
