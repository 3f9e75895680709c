package proxy

import (
	"encoding/hex"
	"fmt"

	"github.com/opencontainers/go-digest"
)

func hexDigest(d digest.Digest) ([]byte, error) {
	b, err := hex.DecodeString(d.Encoded())
	if err != nil || len(b) != 32 {
		return nil, fmt.Errorf("not a sha256 digest: %s", d)
	}
	return b, nil
}
