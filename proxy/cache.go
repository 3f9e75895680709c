package proxy

import (
	"container/list"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"

	"github.com/opencontainers/go-digest"
)

// blobCache keeps restored (and freshly fetched) blobs as plain files,
// evicting the least recently used beyond a size. It is disposable: losing
// it costs restore time, never data.
type blobCache struct {
	dir string
	max int64

	mu    sync.Mutex
	size  int64
	lru   *list.List // front = most recent; values *cacheEntry
	index map[digest.Digest]*list.Element
	live  map[digest.Digest]*liveBlob // restores in progress (live.go)

	upgrading atomic.Bool // a recipe upgrade runs (upgrade.go)
}

type cacheEntry struct {
	d    digest.Digest
	size int64
}

func newBlobCache(dir string, max int64) (*blobCache, error) {
	if err := os.MkdirAll(filepath.Join(dir, "tmp"), 0o700); err != nil {
		return nil, fmt.Errorf("creating cache dir: %w", err)
	}
	c := &blobCache{dir: dir, max: max, lru: list.New(), index: map[digest.Digest]*list.Element{}, live: map[digest.Digest]*liveBlob{}}
	// Adopt what a previous run left, oldest first so the newest end up in front.
	type found struct {
		e   cacheEntry
		mod int64
	}
	var all []found
	_ = filepath.WalkDir(dir, func(p string, de fs.DirEntry, err error) error {
		if err != nil || de.IsDir() {
			return nil
		}
		if filepath.Base(filepath.Dir(p)) == "tmp" {
			_ = os.Remove(p)
			return nil
		}
		d := digest.NewDigestFromEncoded(digest.Algorithm(filepath.Base(filepath.Dir(p))), de.Name())
		if d.Validate() != nil {
			return nil
		}
		fi, err := de.Info()
		if err != nil {
			return nil
		}
		all = append(all, found{cacheEntry{d, fi.Size()}, fi.ModTime().UnixNano()})
		return nil
	})
	sort.Slice(all, func(i, j int) bool { return all[i].mod < all[j].mod })
	for _, f := range all {
		c.index[f.e.d] = c.lru.PushFront(&cacheEntry{f.e.d, f.e.size})
		c.size += f.e.size
	}
	c.mu.Lock()
	c.evictLocked()
	c.mu.Unlock()
	return c, nil
}

func (c *blobCache) path(d digest.Digest) string {
	return filepath.Join(c.dir, string(d.Algorithm()), d.Encoded())
}

// tempFile creates a file to be committed with add.
func (c *blobCache) tempFile() (*os.File, error) {
	return os.CreateTemp(filepath.Join(c.dir, "tmp"), "blob-")
}

// open returns the cached blob and marks it used; nil when absent.
func (c *blobCache) open(d digest.Digest) *os.File {
	c.mu.Lock()
	el, ok := c.index[d]
	if ok {
		c.lru.MoveToFront(el)
	}
	c.mu.Unlock()
	if !ok {
		return nil
	}
	f, err := os.Open(c.path(d))
	if err != nil {
		c.remove(d)
		return nil
	}
	return f
}

func (c *blobCache) has(d digest.Digest) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	_, ok := c.index[d]
	return ok
}

// add moves a verified temp file into the cache.
func (c *blobCache) add(d digest.Digest, tmp string, size int64) error {
	p := c.path(d)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	if err := os.Rename(tmp, p); err != nil {
		return fmt.Errorf("caching %s: %w", d, err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.index[d]; ok {
		c.size -= el.Value.(*cacheEntry).size
		c.lru.Remove(el)
	}
	c.index[d] = c.lru.PushFront(&cacheEntry{d, size})
	c.size += size
	c.evictLocked()
	return nil
}

func (c *blobCache) remove(d digest.Digest) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.index[d]; ok {
		c.size -= el.Value.(*cacheEntry).size
		c.lru.Remove(el)
		delete(c.index, d)
	}
	_ = os.Remove(c.path(d))
}

// evictLocked drops least recently used blobs beyond max; open readers keep
// their file (unlinked, not truncated).
func (c *blobCache) evictLocked() {
	for c.size > c.max && c.lru.Len() > 1 {
		el := c.lru.Back()
		e := el.Value.(*cacheEntry)
		c.lru.Remove(el)
		delete(c.index, e.d)
		c.size -= e.size
		_ = os.Remove(c.path(e.d))
	}
}

func (c *blobCache) usage() (n int, size int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lru.Len(), c.size
}
