package layout

import (
	"fmt"
	"path"
	"strings"
)

// maxSymlinkHops bounds symlink resolution inside a tree (like MAXSYMLINKS).
const maxSymlinkHops = 40

// Merge applies chain[0] (bottom) .. chain[len-1] (top) the way containerd's
// tar applier would on an empty root: per layer, whiteouts and opaque
// markers first hide what the lower layers have, then the layer's entries
// are added in order (later ones replace earlier ones, directories over
// directories keep their children). Parent paths are resolved through
// symlinks within the tree, as the applier does; missing parents are
// created as 0755 directories. Hardlinked names share one *Node. Inode
// numbers are assigned in creation order (root is 1), so the same chain
// always gives the same numbers.
func Merge(chain []*Manifest) (*Tree, error) {
	mg := &merger{next: 2}
	mg.root = &Node{Entry: Entry{Type: TypeDir, Path: ".", Mode: 0o755}, Children: map[string]*Node{}, Ino: 1}
	for li, m := range chain {
		for i := range m.Entries {
			e := &m.Entries[i]
			if !e.Whiteout && !e.Opaque {
				continue
			}
			if err := mg.hide(e); err != nil {
				return nil, fmt.Errorf("layer %d (%s): %w", li, m.DiffID, err)
			}
		}
		for i := range m.Entries {
			e := &m.Entries[i]
			if e.Whiteout || e.Opaque || strings.HasPrefix(path.Base(e.Path), whiteoutMetaPrefix) {
				continue
			}
			if err := mg.add(e); err != nil {
				return nil, fmt.Errorf("layer %d (%s): %w", li, m.DiffID, err)
			}
		}
	}
	setDirLinks(mg.root)
	mg.root.Nlink = dirNlink(mg.root)
	return &Tree{Root: mg.root}, nil
}

// Lookup returns the node at a clean relative path, without following
// symlinks; nil if absent. "" or "." is the root.
func (t *Tree) Lookup(p string) *Node {
	n := t.Root
	if p == "" || p == "." {
		return n
	}
	for _, c := range strings.Split(p, "/") {
		if n.Children == nil {
			return nil
		}
		if n = n.Children[c]; n == nil {
			return nil
		}
	}
	return n
}

// Walk calls fn for every name in the tree (depth first, sorted is not
// guaranteed); a hardlinked node is visited once per name.
func (t *Tree) Walk(fn func(p string, n *Node) error) error {
	var walk func(p string, n *Node) error
	walk = func(p string, n *Node) error {
		if err := fn(p, n); err != nil {
			return err
		}
		for name, c := range n.Children {
			cp := name
			if p != "." {
				cp = p + "/" + name
			}
			if err := walk(cp, c); err != nil {
				return err
			}
		}
		return nil
	}
	return walk(".", t.Root)
}

type merger struct {
	root *Node
	next uint64
}

func (mg *merger) newNode(e Entry) *Node {
	n := &Node{Entry: e, Nlink: 1, Ino: mg.next}
	mg.next++
	if e.Type == TypeDir {
		n.Children = map[string]*Node{}
	}
	return n
}

// parent resolves the directory holding p, following symlinks in the
// leading components. With create, missing directories are made.
func (mg *merger) parent(p string, create bool) (*Node, error) {
	dir := parentDir(p)
	if dir == "." {
		return mg.root, nil
	}
	hops := 0
	stack, err := mg.walkDir([]*Node{mg.root}, strings.Split(dir, "/"), dir, create, &hops)
	if err != nil || stack == nil {
		return nil, err
	}
	return stack[len(stack)-1], nil
}

// walkDir walks comps from the directory on top of stack (the stack is the
// chain of ancestors, for ".."); it returns the stack of the directory
// reached, nil if it does not exist and create is false.
func (mg *merger) walkDir(stack []*Node, comps []string, full string, create bool, hops *int) ([]*Node, error) {
	for i, c := range comps {
		cur := stack[len(stack)-1]
		switch c {
		case "", ".":
			continue
		case "..":
			if len(stack) > 1 {
				stack = stack[:len(stack)-1]
			}
			continue
		}
		child := cur.Children[c]
		if child == nil {
			if !create {
				return nil, nil
			}
			prefix := strings.Join(comps[:i+1], "/")
			child = mg.newNode(Entry{Type: TypeDir, Path: prefix, Mode: 0o755})
			cur.Children[c] = child
		}
		switch child.Entry.Type {
		case TypeDir:
			stack = append(stack, child)
		case TypeSymlink:
			*hops++
			if *hops > maxSymlinkHops {
				return nil, fmt.Errorf("%w: too many symlinks resolving %q", ErrInvalidLayer, full)
			}
			target := child.Entry.Linkname
			base := stack
			if strings.HasPrefix(target, "/") {
				base = []*Node{mg.root} // absolute targets stay inside the root
			}
			next, err := mg.walkDir(append([]*Node(nil), base...), strings.Split(target, "/"), full, create, hops)
			if err != nil || next == nil {
				return nil, err
			}
			stack = next
		default:
			return nil, fmt.Errorf("%w: %q: parent %q is not a directory", ErrInvalidLayer, full, c)
		}
	}
	return stack, nil
}

// hide applies a whiteout or opaque marker to what is already merged.
func (mg *merger) hide(e *Entry) error {
	if e.Opaque {
		var dir *Node
		if e.Path == "." {
			dir = mg.root
		} else {
			par, err := mg.parent(e.Path, false)
			if err != nil || par == nil {
				return nil // nothing below to hide (a broken lower path hides nothing)
			}
			dir = par.Children[path.Base(e.Path)]
		}
		if dir != nil && dir.Entry.Type == TypeDir {
			for name, c := range dir.Children {
				unlinkTree(c)
				delete(dir.Children, name)
			}
		}
		return nil
	}
	par, err := mg.parent(e.Path, false)
	if err != nil || par == nil {
		return nil
	}
	name := path.Base(e.Path)
	if c := par.Children[name]; c != nil {
		unlinkTree(c)
		delete(par.Children, name)
	}
	return nil
}

// unlinkTree drops one name of n (and, for a directory, of everything in it).
func unlinkTree(n *Node) {
	n.Nlink--
	for _, c := range n.Children {
		unlinkTree(c)
	}
}

func (mg *merger) add(e *Entry) error {
	if e.Path == "." {
		if e.Type != TypeDir {
			return fmt.Errorf("%w: layer root is a %q, not a directory", ErrInvalidLayer, e.Type)
		}
		mg.root.Entry = *e
		return nil
	}
	par, err := mg.parent(e.Path, true)
	if err != nil {
		return err
	}
	name := path.Base(e.Path)
	old := par.Children[name]
	switch e.Type {
	case TypeDir:
		if old != nil && old.Entry.Type == TypeDir {
			old.Entry = *e // directory over directory: metadata replaced, children kept
			return nil
		}
		n := mg.newNode(*e)
		mg.replace(par, name, old, n)
	case TypeHardlink:
		tpar, err := mg.parent(e.Linkname, false)
		if err != nil {
			return err
		}
		var target *Node
		if tpar != nil {
			target = tpar.Children[path.Base(e.Linkname)]
		}
		if target == nil {
			return fmt.Errorf("%w: hardlink %q: target %q does not exist", ErrInvalidLayer, e.Path, e.Linkname)
		}
		if target.Entry.Type == TypeDir {
			return fmt.Errorf("%w: hardlink %q to directory %q", ErrInvalidLayer, e.Path, e.Linkname)
		}
		if old == target {
			return nil
		}
		target.Nlink++
		mg.replace(par, name, old, target)
	default:
		mg.replace(par, name, old, mg.newNode(*e))
	}
	return nil
}

func (mg *merger) replace(par *Node, name string, old, n *Node) {
	if old != nil {
		unlinkTree(old)
	}
	par.Children[name] = n
}

// setDirLinks gives directories the classic link count: 2 + subdirectories.
func setDirLinks(n *Node) {
	for _, c := range n.Children {
		if c.Entry.Type == TypeDir {
			c.Nlink = dirNlink(c)
			setDirLinks(c)
		}
	}
}

func dirNlink(n *Node) int {
	k := 2
	for _, c := range n.Children {
		if c.Entry.Type == TypeDir {
			k++
		}
	}
	return k
}
