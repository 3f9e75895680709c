package layout

import (
	"errors"
	"sort"
	"strings"
	"testing"
)

// man builds a manifest from compact specs: "f:path", "d:path", "l:path>target"
// (symlink), "h:path>target" (hardlink), "w:path" (whiteout), "o:path" (opaque).
func man(specs ...string) *Manifest {
	m := &Manifest{}
	for _, s := range specs {
		kind, rest, _ := strings.Cut(s, ":")
		p, target, _ := strings.Cut(rest, ">")
		e := Entry{Path: p, Mode: 0o644}
		switch kind {
		case "f":
			e.Type, e.Digest, e.Size = TypeFile, sha([]byte(s)), int64(len(s))
		case "d":
			e.Type, e.Mode = TypeDir, 0o700
		case "l":
			e.Type, e.Linkname = TypeSymlink, target
		case "h":
			e.Type, e.Linkname = TypeHardlink, target
		case "w":
			e.Type, e.Whiteout = TypeFile, true
		case "o":
			e.Type, e.Opaque = TypeFile, true
		}
		m.Entries = append(m.Entries, e)
	}
	return m
}

// listing renders a tree as sorted "path:type" (hardlinked nodes with their link count).
func listing(t *Tree) string {
	var out []string
	t.Walk(func(p string, n *Node) error {
		if p == "." {
			return nil
		}
		s := p + ":" + string(rune(n.Entry.Type))
		if n.Entry.Type != TypeDir && n.Nlink > 1 {
			s += "x" + string(rune('0'+n.Nlink))
		}
		out = append(out, s)
		return nil
	})
	sort.Slice(out, func(i, j int) bool {
		pi, _, _ := strings.Cut(out[i], ":")
		pj, _, _ := strings.Cut(out[j], ":")
		return pi < pj
	})
	return strings.Join(out, " ")
}

func TestMergeTable(t *testing.T) {
	cases := []struct {
		name  string
		chain []*Manifest
		want  string
		err   bool
	}{
		{"implicit parents", []*Manifest{man("f:a/b/c")}, "a:5 a/b:5 a/b/c:0", false},
		{"whiteout file", []*Manifest{man("f:a/x", "f:a/y"), man("w:a/x")}, "a:5 a/y:0", false},
		{"whiteout dir", []*Manifest{man("f:a/b/c", "f:z"), man("w:a/b")}, "a:5 z:0", false},
		{"whiteout missing is no-op", []*Manifest{man("f:z"), man("w:nope/x", "w:y")}, "z:0", false},
		{"opaque hides lower only", []*Manifest{man("f:a/old", "f:a/s/old"), man("d:a", "f:a/new", "o:a")}, "a:5 a/new:0", false},
		{"opaque before own children", []*Manifest{man("f:a/old"), man("o:a", "f:a/new")}, "a:5 a/new:0", false},
		{"whiteout then re-add same layer", []*Manifest{man("d:a", "f:a/x"), man("w:a", "f:a/y")}, "a:5 a/y:0", false},
		{"file replaces dir", []*Manifest{man("f:a/x"), man("f:a")}, "a:0", false},
		{"dir replaces file", []*Manifest{man("f:a"), man("f:a/x")}, "", true},
		{"dir over dir keeps children", []*Manifest{man("f:a/x"), man("d:a")}, "a:5 a/x:0", false},
		{"later entry wins", []*Manifest{man("f:a", "l:a>b")}, "a:2", false},
		{"hardlink", []*Manifest{man("f:a", "h:b>a", "h:c>a")}, "a:0x3 b:0x3 c:0x3", false},
		{"hardlink to lower", []*Manifest{man("f:a"), man("h:b>a")}, "a:0x2 b:0x2", false},
		{"hardlink survives target removal", []*Manifest{man("f:a", "h:b>a"), man("w:a")}, "b:0", false},
		{"hardlink missing target", []*Manifest{man("h:b>a")}, "", true},
		{"hardlink to dir", []*Manifest{man("d:a", "h:b>a")}, "", true},
		{"parent through lower symlink", []*Manifest{man("d:usr/lib", "l:lib>usr/lib"), man("f:lib/x")}, "lib:2 usr:5 usr/lib:5 usr/lib/x:0", false},
		{"absolute symlink stays in root", []*Manifest{man("d:usr/lib", "l:lib>/usr/lib"), man("f:lib/x")}, "lib:2 usr:5 usr/lib:5 usr/lib/x:0", false},
		{"dotdot symlink clamps at root", []*Manifest{man("d:usr", "l:usr/up>../../../..")}, "usr:5 usr/up:2", false},
		{"symlink loop", []*Manifest{man("l:a>b", "l:b>a"), man("f:a/x")}, "", true},
		{"whiteout through symlink", []*Manifest{man("f:real/x", "l:s>real"), man("w:s/x")}, "real:5 s:2", false},
		{"aufs meta skipped", []*Manifest{man("f:a", "d:.wh..wh.plnk")}, "a:0", false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tree, err := Merge(c.chain)
			if c.err {
				if !errors.Is(err, ErrInvalidLayer) {
					t.Fatalf("want ErrInvalidLayer, got %v (tree %s)", err, listingOrNil(tree))
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := listing(tree); got != c.want {
				t.Fatalf("\n got %s\nwant %s", got, c.want)
			}
		})
	}
}

func listingOrNil(t *Tree) string {
	if t == nil {
		return "<nil>"
	}
	return listing(t)
}

func TestMergeInodesStable(t *testing.T) {
	chain := []*Manifest{man("d:a", "f:a/x", "f:b", "h:c>b"), man("f:a/y", "w:b")}
	t1, err := Merge(chain)
	must(t, err)
	t2, err := Merge(chain)
	must(t, err)
	if t1.Root.Ino != 1 {
		t.Fatal("root ino")
	}
	seen := map[uint64]*Node{}
	t1.Walk(func(p string, n *Node) error {
		if o := seen[n.Ino]; o != nil && o != n {
			t.Errorf("ino %d used twice", n.Ino)
		}
		seen[n.Ino] = n
		if m := t2.Lookup(p); m == nil || m.Ino != n.Ino {
			t.Errorf("%s: ino differs between merges", p)
		}
		return nil
	})
	if n := t1.Lookup("a"); n.Nlink != 2 || n.Entry.Mode != 0o700 {
		t.Errorf("dir a: nlink %d mode %o", n.Nlink, n.Entry.Mode)
	}
	if n := t1.Lookup("c"); n.Nlink != 1 {
		t.Errorf("c nlink %d after b was whited out", n.Nlink)
	}
}
