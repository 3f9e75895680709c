package proxy

import "github.com/opencontainers/go-digest"

// SetRecipeHook makes every recipe detection call f before a found recipe
// replaces the retained blob; nil removes it.
func SetRecipeHook(f func(digest.Digest)) {
	if f == nil {
		recipeHook.Store(nil)
		return
	}
	recipeHook.Store(&f)
}
