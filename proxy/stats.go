package proxy

import (
	"context"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/dupsnap/dupsnap/proxy/recipe"
)

// Stats describes the store.
type Stats struct {
	Images int `json:"images"`
	Layers int `json:"layers"`
	// Layers by how they are restored.
	TarLayers    int `json:"tarLayers"`
	RecipeLayers int `json:"recipeLayers"`
	// ParallelRecipes: recipe layers with checkpoints (restored on all cores).
	ParallelRecipes int `json:"parallelRecipeLayers"`
	RetainedLayers  int `json:"retainedLayers"`
	// Bytes of compressed layer blobs kept whole (no recipe).
	RetainedBytes int64 `json:"retainedBytes"`
	// LogicalBytes: what the store can serve (layer blob sizes plus other blobs).
	LogicalBytes int64 `json:"logicalBytes"`
	// PhysicalBytes: what it uses (objects as stored, layout manifests, blob store).
	PhysicalBytes int64 `json:"physicalBytes"`
	Objects       int   `json:"objects"`
	ObjectBytes   int64 `json:"objectBytes"`  // uncompressed
	ObjectStored  int64 `json:"objectStored"` // on disk
	LayoutBytes   int64 `json:"layoutBytes"`  // layout manifests
	BlobBytes     int64 `json:"blobBytes"`    // blob store (manifests, configs, retained layers)
	CacheBlobs    int   `json:"cacheBlobs"`   // restore cache
	CacheBytes    int64 `json:"cacheBytes"`
}

// Stats walks the store; it also refreshes the store gauges.
func (s *Server) Stats(ctx context.Context) (Stats, error) {
	var st Stats
	imgs, err := s.images(ctx)
	if err != nil {
		return st, err
	}
	st.Images = len(imgs)
	lkeys, err := s.meta.List(ctx, "layers")
	if err != nil {
		return st, err
	}
	layers := map[digest.Digest]bool{}
	for _, k := range lkeys {
		var rec layerRecord
		if s.getJSON(ctx, k, &rec) != nil {
			continue
		}
		layers[rec.Digest] = true
		st.Layers++
		st.LogicalBytes += rec.Size
		switch {
		case rec.Retained:
			st.RetainedLayers++
			st.RetainedBytes += rec.Size
		case rec.Recipe != nil:
			st.RecipeLayers++
			if r, err := recipe.Unmarshal(rec.Recipe); err == nil && r.Parallel() {
				st.ParallelRecipes++
			}
		default:
			st.TarLayers++
		}
	}
	err = s.blobs.Walk(ctx, func(d digest.Digest, size int64, _ time.Time) error {
		st.BlobBytes += size
		if !layers[d] {
			st.LogicalBytes += size
		}
		return nil
	})
	if err != nil {
		return st, err
	}
	err = s.files.WalkObjects(ctx, func(i ObjectInfo) error {
		st.Objects++
		st.ObjectBytes += i.Size
		st.ObjectStored += i.Stored
		return nil
	})
	if err != nil {
		return st, err
	}
	err = s.files.WalkLayouts(ctx, func(_ digest.Digest, size int64, _ time.Time) error {
		st.LayoutBytes += size
		return nil
	})
	if err != nil {
		return st, err
	}
	st.PhysicalBytes = st.ObjectStored + st.LayoutBytes + st.BlobBytes
	st.CacheBlobs, st.CacheBytes = s.cache.usage()
	s.m.logicalBytes.Set(float64(st.LogicalBytes))
	s.m.physicalBytes.Set(float64(st.PhysicalBytes))
	return st, nil
}
