package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"

	"github.com/containerd/log"
	"github.com/coreos/go-systemd/v22/activation"
)

// listen returns the gRPC listener: the socket systemd passed in
// (dupsnap.socket, socket activation) or a new one at address.
//
// Why socket activation: the socket then outlives the daemon. When the
// daemon restarts (crash, upgrade) containerd's connect still succeeds and
// its calls wait in the socket's backlog until the new daemon accepts,
// instead of failing with "connection refused" and backing the channel off
// for up to 3 s (containerd's proxy-plugin MaxDelay).
func listen(ctx context.Context, address string) (l net.Listener, activated bool, err error) {
	ls, err := activation.Listeners() // unsets LISTEN_*: rootfs children must not see them
	if err != nil {
		return nil, false, fmt.Errorf("socket activation: %w", err)
	}
	// Serve the unix socket at address, else the first unix one; close
	// the rest (not ours to serve: a TCP socket in the unit, say).
	want, pick := filepath.Clean(address), -1
	for i, u := range ls {
		if u != nil && u.Addr().Network() == "unix" && (pick < 0 || filepath.Clean(u.Addr().String()) == want) {
			pick = i
		}
	}
	for i, u := range ls {
		if u != nil && i != pick {
			u.Close()
		}
	}
	if pick >= 0 {
		l = ls[pick]
		lg := log.G(ctx).WithField("address", l.Addr().String())
		if filepath.Clean(l.Addr().String()) != want {
			lg.WithField("configured", address).Warn("serving the socket systemd passed, not the configured address; set address (or ListenStream=) so they agree")
		}
		if st, err := os.Stat(l.Addr().String()); err == nil && st.Mode().Perm()&0o077 != 0 {
			lg.WithField("mode", fmt.Sprintf("%04o", st.Mode().Perm())).Warn("activated socket is reachable by other users: set SocketMode=0600 in the socket unit")
		}
		return l, true, nil
	}
	l, err = listenUnix(address)
	return l, false, err
}

// listenUnix replaces a stale socket and makes the new one 0600: the API
// can mount anything, so only root (containerd) may talk to it.
func listenUnix(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o711); err != nil {
		return nil, err
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}
