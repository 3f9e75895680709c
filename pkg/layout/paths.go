package layout

import (
	"fmt"
	"path"
	"strings"
)

const (
	whiteoutPrefix     = ".wh."
	whiteoutMetaPrefix = ".wh..wh."
	whiteoutOpaque     = ".wh..wh..opq"
)

// cleanPath turns a tar member name into the manifest's clean relative form,
// refusing anything that could leave the layer root.
func cleanPath(name string) (string, error) {
	if name == "" {
		return "", fmt.Errorf("%w: empty path", ErrInvalidLayer)
	}
	if strings.HasPrefix(name, "/") {
		return "", fmt.Errorf("%w: absolute path %q", ErrInvalidLayer, name)
	}
	if strings.IndexByte(name, 0) >= 0 {
		return "", fmt.Errorf("%w: NUL in path %q", ErrInvalidLayer, name)
	}
	for _, c := range strings.Split(name, "/") {
		if c == ".." {
			return "", fmt.Errorf("%w: '..' in path %q", ErrInvalidLayer, name)
		}
	}
	return path.Clean(name), nil
}

// parentDir is path.Dir with "." for top-level names.
func parentDir(p string) string {
	return path.Dir(p)
}

// symlinkGuard refuses entries that would be written through a symlink the
// same layer created (a/ -> /etc, then a/passwd).
type symlinkGuard map[string]struct{}

func (g symlinkGuard) check(p string) error {
	if len(g) == 0 {
		return nil
	}
	for i := 0; i < len(p); i++ {
		if p[i] == '/' {
			if _, ok := g[p[:i]]; ok {
				return fmt.Errorf("%w: %q is below symlink %q of the same layer", ErrInvalidLayer, p, p[:i])
			}
		}
	}
	return nil
}

func (g symlinkGuard) set(p string, isLink bool) {
	if isLink {
		g[p] = struct{}{}
	} else if len(g) > 0 {
		delete(g, p)
	}
}
