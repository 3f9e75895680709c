package rootfs

import (
	"context"
	"errors"

	"github.com/dupsnap/dupsnap/pkg/cas"
	"github.com/dupsnap/dupsnap/pkg/layout"
)

func fromDirStub(ctx context.Context, b *cas.Batch, dir string) (*layout.Manifest, error) {
	return nil, errors.New("FromDir not yet available")
}
