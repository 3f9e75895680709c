package rootfs

import (
	"github.com/dupsnap/dupsnap/pkg/cas"
	"github.com/dupsnap/dupsnap/pkg/layout"
)

// Work a spare server does for its expected chain before it is assigned,
// so that it is off the container's start.

// linkIndex is the hardlink index newRootFS builds for tree (rootFS.links).
func linkIndex(tree *layout.Tree) map[*layout.Node][]string {
	r := &rootFS{links: map[*layout.Node][]string{}}
	r.indexLinks(tree.Root, "")
	return r.links
}

// newRootFSIndexed is newRootFS for a tree whose link index was built
// ahead (links; nil: build it now). newRootFS walks the tree only for that
// index, so it gets a childless root of the same identity and the real
// tree and index are put in place after.
func newRootFSIndexed(tree *layout.Tree, store *cas.Store, cfg Config, links map[*layout.Node][]string) *rootFS {
	if links == nil {
		return newRootFS(tree, store, cfg)
	}
	stub := &layout.Tree{Root: &layout.Node{Entry: tree.Root.Entry, Nlink: tree.Root.Nlink, Ino: tree.Root.Ino}}
	r := newRootFS(stub, store, cfg)
	r.tree = tree
	r.links = links
	return r
}
