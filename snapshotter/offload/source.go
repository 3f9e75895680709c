package offload

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"

	contentapi "github.com/containerd/containerd/api/services/content/v1"
	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/content/proxy"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// labelSourcePrefix: containerd's pull labels every fetched manifest and
// config with containerd.io/distribution.source.<hostname>=<repo>[,<repo>..]
// (core/remotes/docker/handler.go), before the unpacker prepares layers.
const labelSourcePrefix = "containerd.io/distribution.source."

// maxConfigSize bounds the blobs read as candidate image configs.
const maxConfigSize = 4 << 20

// sourceFinder answers "which repository is this layer being pulled from"
// for pulls that pass no cri.image-ref label (nerdctl, plain client pulls).
// It trusts only containerd: the image config that lists the diffID is in
// containerd's content store (digest-verified when it was written), and
// the repository is the one containerd itself pulled that config from.
// dupproxy still authorizes the repository on every request, so nothing
// is served that the repository does not reference.
type sourceFinder struct {
	address, defaultNS string

	mu      sync.Mutex
	conn    *grpc.ClientConn
	store   content.Store
	configs map[digest.Digest][]digest.Digest // blob -> diffIDs (nil: not a config)
}

type source struct{ host, repo string }

func newSourceFinder(address, ns string) *sourceFinder {
	return &sourceFinder{address: address, defaultNS: ns, configs: map[digest.Digest][]digest.Digest{}}
}

func (s *sourceFinder) contentStore() (content.Store, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.store != nil {
		return s.store, nil
	}
	conn, err := grpc.NewClient("unix://"+s.address,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(16<<20)))
	if err != nil {
		return nil, fmt.Errorf("offload: containerd %s: %w", s.address, err)
	}
	s.conn, s.store = conn, proxy.NewContentStore(contentapi.NewContentClient(conn))
	return s.store, nil
}

func (s *sourceFinder) close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conn != nil {
		s.conn.Close()
	}
}

// find lists the sources of the image configs that name diffID, in the
// namespace of the pull (containerd forwards it with every snapshot call).
func (s *sourceFinder) find(ctx context.Context, diffID digest.Digest) ([]source, error) {
	cs, err := s.contentStore()
	if err != nil {
		return nil, err
	}
	ns, ok := namespaces.Namespace(ctx)
	if !ok || ns == "" {
		ns = s.defaultNS
	}
	ctx = namespaces.WithNamespace(context.WithoutCancel(ctx), ns)
	var (
		out  []source
		seen = map[source]bool{}
	)
	var infos []content.Info
	if err := cs.Walk(ctx, func(info content.Info) error {
		if info.Size > 0 && info.Size <= maxConfigSize && hasSource(info.Labels) {
			infos = append(infos, info)
		}
		return nil
	}); err != nil {
		return nil, fmt.Errorf("offload: walking containerd content: %w", err)
	}
	for _, info := range infos {
		ids, err := s.diffIDs(ctx, cs, info)
		if err != nil {
			log.G(ctx).WithError(err).WithField("blob", info.Digest).Debug("offload: reading candidate config")
			continue
		}
		for _, id := range ids {
			if id != diffID {
				continue
			}
			for k, v := range info.Labels {
				if !strings.HasPrefix(k, labelSourcePrefix) {
					continue
				}
				for _, repo := range strings.Split(v, ",") {
					src := source{host: strings.TrimPrefix(k, labelSourcePrefix), repo: repo}
					if repo != "" && !seen[src] {
						seen[src] = true
						out = append(out, src)
					}
				}
			}
		}
	}
	return out, nil
}

func hasSource(labels map[string]string) bool {
	for k := range labels {
		if strings.HasPrefix(k, labelSourcePrefix) {
			return true
		}
	}
	return false
}

// diffIDs parses a blob as an image config (cached: blobs are immutable).
func (s *sourceFinder) diffIDs(ctx context.Context, cs content.Store, info content.Info) ([]digest.Digest, error) {
	s.mu.Lock()
	ids, ok := s.configs[info.Digest]
	s.mu.Unlock()
	if ok {
		return ids, nil
	}
	b, err := content.ReadBlob(ctx, cs, ocispec.Descriptor{Digest: info.Digest, Size: info.Size})
	if err != nil {
		return nil, err
	}
	var cfg struct {
		RootFS *ocispec.RootFS `json:"rootfs"`
	}
	if json.Unmarshal(b, &cfg) == nil && cfg.RootFS != nil {
		ids = cfg.RootFS.DiffIDs
	}
	s.mu.Lock()
	s.configs[info.Digest] = ids
	s.mu.Unlock()
	return ids, nil
}
