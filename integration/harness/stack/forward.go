package stack

import (
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Forwarder is a TCP relay that counts the bytes each way: put in front of
// a registry or dupproxy it measures what a node really transferred,
// whoever (containerd, dupsnap) made the requests.
type Forwarder struct {
	Addr   string // host:port to dial instead of the target
	target string
	l      net.Listener
	down   atomic.Int64 // target -> client
	up     atomic.Int64
	wg     sync.WaitGroup
	mu     sync.Mutex
	conns  map[net.Conn]bool
}

// Forward starts a relay on 127.0.0.1 to target.
func Forward(target string) (*Forwarder, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	f := &Forwarder{Addr: l.Addr().String(), target: target, l: l, conns: map[net.Conn]bool{}}
	f.wg.Add(1)
	go f.serve()
	return f, nil
}

// Down is the bytes sent from the target to clients since the last Reset.
func (f *Forwarder) Down() int64 { return f.down.Load() }

// Up is the bytes sent by clients.
func (f *Forwarder) Up() int64 { return f.up.Load() }

// Reset zeroes the counters.
func (f *Forwarder) Reset() { f.down.Store(0); f.up.Store(0) }

// SetTarget points new connections elsewhere (a restarted dupproxy).
func (f *Forwarder) SetTarget(t string) { f.mu.Lock(); f.target = t; f.mu.Unlock() }

func (f *Forwarder) serve() {
	defer f.wg.Done()
	for {
		c, err := f.l.Accept()
		if err != nil {
			return
		}
		f.mu.Lock()
		target := f.target
		f.conns[c] = true
		f.mu.Unlock()
		f.wg.Add(1)
		go func() {
			defer f.wg.Done()
			defer func() { f.mu.Lock(); delete(f.conns, c); f.mu.Unlock(); c.Close() }()
			u, err := net.DialTimeout("tcp", target, 10*time.Second)
			if err != nil {
				return
			}
			// Tracked too, so that Close never waits on a silent upstream.
			f.mu.Lock()
			f.conns[u] = true
			f.mu.Unlock()
			defer func() { f.mu.Lock(); delete(f.conns, u); f.mu.Unlock(); u.Close() }()
			done := make(chan struct{})
			go func() {
				n, _ := io.Copy(u, c)
				f.up.Add(n)
				u.(*net.TCPConn).CloseWrite()
				close(done)
			}()
			n, _ := io.Copy(countWriter{c, &f.down}, u)
			_ = n
			c.(*net.TCPConn).CloseWrite()
			<-done
		}()
	}
}

type countWriter struct {
	w io.Writer
	n *atomic.Int64
}

func (c countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n.Add(int64(n))
	return n, err
}

// Close stops the relay and drops its connections.
func (f *Forwarder) Close() {
	f.l.Close()
	f.mu.Lock()
	for c := range f.conns {
		c.Close()
	}
	f.mu.Unlock()
	f.wg.Wait()
}
