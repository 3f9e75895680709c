package integration

import (
	"context"
	"net"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	dconfig "github.com/containerd/containerd/v2/core/remotes/docker/config"
	"github.com/containerd/containerd/v2/pkg/namespaces"
)

func netListen() (net.Listener, error) { return net.Listen("tcp", "127.0.0.1:0") }

// clientPull pulls ref exactly as nerdctl does with --snapshotter: the
// containerd Go client with WithPullUnpack and WithPullSnapshotter, and no
// handler wrapper, so the snapshotter sees no cri.* labels.
func clientPull(ctx context.Context, address, ns, hostsDir, ref, snapshotter string) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	c, err := containerd.New(address, containerd.WithTimeout(10*time.Second))
	if err != nil {
		return err
	}
	defer c.Close()
	ctx = namespaces.WithNamespace(ctx, ns)
	resolver := docker.NewResolver(docker.ResolverOptions{
		Hosts: dconfig.ConfigureHosts(ctx, dconfig.HostOptions{HostDir: dconfig.HostDirFromRoot(hostsDir), DefaultScheme: "http"}),
	})
	_, err = c.Pull(ctx, ref, containerd.WithPullUnpack, containerd.WithPullSnapshotter(snapshotter), containerd.WithResolver(resolver))
	return err
}
