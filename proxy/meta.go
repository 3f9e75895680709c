package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Records kept in the MetaStore. Keys (repo names are validated by nameRe,
// whose components never start with '_', so "_tags" etc. cannot collide):
//
//	layers/<alg>/<hex>                              layerRecord
//	repos/<upstream>/<name>/_tags/<tag>             tagRecord
//	repos/<upstream>/<name>/_manifests/<alg>/<hex>  manifestLink (an "image" for eviction)
//	repos/<upstream>/<name>/_blobs/<alg>/<hex>      blobLink: the repo may serve this blob
//	repos/<upstream>/<name>/_referrers/<alg>/<hex>  last referrers index seen upstream

var (
	nameRe = regexp.MustCompile(`^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$`)
	tagRe  = regexp.MustCompile(`^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$`)
)

func validName(n string) bool { return len(n) <= 255 && nameRe.MatchString(n) }

func digestKey(d digest.Digest) string { return string(d.Algorithm()) + "/" + d.Encoded() }

func keyDigest(k string) (digest.Digest, bool) {
	parts := strings.Split(k, "/")
	if len(parts) < 2 {
		return "", false
	}
	d := digest.NewDigestFromEncoded(digest.Algorithm(parts[len(parts)-2]), parts[len(parts)-1])
	return d, d.Validate() == nil
}

func repoKey(up, name string) string { return "repos/" + up + "/" + name }

// layerRecord describes how a layer blob is restored.
type layerRecord struct {
	Digest    digest.Digest `json:"digest"`
	MediaType string        `json:"mediaType,omitempty"`
	Size      int64         `json:"size"`
	DiffID    digest.Digest `json:"diffID"`
	// Format of the blob: "tar", "gzip" or "zstd".
	Format string `json:"format"`
	// Recipe (proxy/recipe.Marshal) re-creates a compressed blob from the tar.
	Recipe []byte `json:"recipe,omitempty"`
	// Retained: the compressed blob itself is kept in the BlobStore.
	Retained bool `json:"retained,omitempty"`
	// RecipeTried: detection ran (found nothing if Retained is still set).
	RecipeTried bool      `json:"recipeTried,omitempty"`
	Ingested    time.Time `json:"ingested"`
}

type tagRecord struct {
	Digest    digest.Digest `json:"digest"`
	MediaType string        `json:"mediaType"`
	Size      int64         `json:"size"`
	Fetched   time.Time     `json:"fetched"`
}

// manifestLink records that a repository served a manifest, with what the
// manifest references (authorization and GC roots).
type manifestLink struct {
	Digest     digest.Digest        `json:"digest"`
	MediaType  string               `json:"mediaType"`
	Size       int64                `json:"size"`
	Fetched    time.Time            `json:"fetched"`
	LastAccess time.Time            `json:"lastAccess"`
	Config     *ocispec.Descriptor  `json:"config,omitempty"`
	Layers     []ocispec.Descriptor `json:"layers,omitempty"`
	Manifests  []ocispec.Descriptor `json:"manifests,omitempty"`
	Subject    *ocispec.Descriptor  `json:"subject,omitempty"`
}

type blobLink struct {
	MediaType string `json:"mediaType,omitempty"`
	Size      int64  `json:"size,omitempty"`
	// Layer: referenced as a layer by a manifest of the repository.
	Layer bool `json:"layer,omitempty"`
}

func (s *Server) getJSON(ctx context.Context, key string, v any) error {
	b, err := s.meta.Get(ctx, key)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("corrupt record %s: %w", key, err)
	}
	return nil
}

func (s *Server) putJSON(ctx context.Context, key string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if err := s.meta.Put(ctx, key, b); err != nil {
		return fmt.Errorf("writing record %s: %w", key, err)
	}
	return nil
}

func (s *Server) layerRecord(ctx context.Context, d digest.Digest) (*layerRecord, error) {
	var rec layerRecord
	if err := s.getJSON(ctx, "layers/"+digestKey(d), &rec); err != nil {
		return nil, err
	}
	return &rec, nil
}

func (s *Server) blobLinkOf(ctx context.Context, repo string, d digest.Digest) (*blobLink, error) {
	var l blobLink
	if err := s.getJSON(ctx, repo+"/_blobs/"+digestKey(d), &l); err != nil {
		return nil, err
	}
	return &l, nil
}

func (s *Server) manifestLinkOf(ctx context.Context, repo string, d digest.Digest) (*manifestLink, error) {
	var l manifestLink
	if err := s.getJSON(ctx, repo+"/_manifests/"+digestKey(d), &l); err != nil {
		return nil, err
	}
	return &l, nil
}

// linkManifest records m (already stored) in repo together with the blobs it
// references; the blob links are what later authorizes blob and dedup reads.
func (s *Server) linkManifest(ctx context.Context, repo string, l *manifestLink) error {
	for _, d := range l.Layers {
		if err := s.putJSON(ctx, repo+"/_blobs/"+digestKey(d.Digest), blobLink{MediaType: d.MediaType, Size: d.Size, Layer: true}); err != nil {
			return err
		}
	}
	if l.Config != nil {
		if err := s.putJSON(ctx, repo+"/_blobs/"+digestKey(l.Config.Digest), blobLink{MediaType: l.Config.MediaType, Size: l.Config.Size}); err != nil {
			return err
		}
	}
	return s.putJSON(ctx, repo+"/_manifests/"+digestKey(l.Digest), l)
}

// touchManifest updates the last access of an image, at most once a minute.
func (s *Server) touchManifest(ctx context.Context, repo string, d digest.Digest) {
	l, err := s.manifestLinkOf(ctx, repo, d)
	if err != nil || time.Since(l.LastAccess) < time.Minute {
		return
	}
	l.LastAccess = time.Now()
	_ = s.putJSON(ctx, repo+"/_manifests/"+digestKey(d), l)
}

func isNotFound(err error) bool { return errors.Is(err, errNotFound) }
