package layout

// Defaults for the zero values of IngestOptions.
const (
	defaultMaxEntries   = 1 << 20
	defaultMaxFileSize  = int64(1) << 40
	defaultMaxHeaderLen = int64(1) << 20
	defaultMaxSize      = int64(1) << 40

	// zstdMaxWindow bounds the memory a zstd frame may ask for (zstd --long=27
	// is the largest window seen in practice for layers).
	zstdMaxWindow = 1 << 27
	// maxManifestBody bounds what Unmarshal will decompress.
	maxManifestBody = 1 << 30
)

func (o IngestOptions) withDefaults() IngestOptions {
	if o.MaxEntries <= 0 {
		o.MaxEntries = defaultMaxEntries
	}
	if o.MaxFileSize <= 0 {
		o.MaxFileSize = defaultMaxFileSize
	}
	if o.MaxHeaderLen <= 0 {
		o.MaxHeaderLen = defaultMaxHeaderLen
	}
	if o.MaxSize <= 0 {
		o.MaxSize = defaultMaxSize
	}
	return o
}

// maxPending bounds the non-payload bytes buffered between two payloads:
// a header may be preceded by PAX, GNU long name/link and global records.
func (o IngestOptions) maxPending() int64 {
	return 2*o.MaxHeaderLen + 8<<10
}
