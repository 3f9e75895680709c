// Package s3store is the small S3 client dupproxy's S3 backend needs: whole
// object puts (optionally create-only), gets, heads, deletes, listings and
// an in-place "touch", over aws-sdk-go-v2. It knows nothing about dupproxy's
// key layout.
package s3store

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	"github.com/aws/smithy-go"
)

// Config locates a bucket. Empty credentials fall back to the
// AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY environment variables.
type Config struct {
	Endpoint  string `toml:"endpoint"`
	Bucket    string `toml:"bucket"`
	Region    string `toml:"region"`
	AccessKey string `toml:"access_key"`
	SecretKey string `toml:"secret_key"`
	// PathStyle addresses http://endpoint/bucket/key (SeaweedFS, MinIO).
	PathStyle bool `toml:"path_style"`
	// Prefix is prepended to every key, so several stores can share a bucket.
	Prefix string `toml:"prefix"`
}

var (
	// ErrNotFound: no object under that key.
	ErrNotFound = errors.New("s3: not found")
	// ErrExists: a create-only put found the key taken.
	ErrExists = errors.New("s3: already exists")
)

// Bucket is a bucket (and key prefix) with a client. Safe for concurrent use.
type Bucket struct {
	c      *s3.Client
	name   string
	prefix string
}

// Info describes one stored object.
type Info struct {
	Key     string // without the bucket prefix
	Size    int64
	ModTime time.Time
	Meta    map[string]string
}

// Open builds a client; it does not contact the endpoint.
func Open(cfg Config) (*Bucket, error) {
	if cfg.Bucket == "" {
		return nil, fmt.Errorf("s3: bucket not set")
	}
	if cfg.Region == "" {
		cfg.Region = "us-east-1"
	}
	ak, sk := cfg.AccessKey, cfg.SecretKey
	if ak == "" {
		ak, sk = os.Getenv("AWS_ACCESS_KEY_ID"), os.Getenv("AWS_SECRET_ACCESS_KEY")
	}
	creds := aws.CredentialsProviderFunc(func(context.Context) (aws.Credentials, error) {
		return aws.Credentials{AccessKeyID: ak, SecretAccessKey: sk, Source: "dupproxy config"}, nil
	})
	tr := http.DefaultTransport.(*http.Transport).Clone()
	// Replicas hit one endpoint with many parallel small requests.
	tr.MaxIdleConnsPerHost = 64
	opts := s3.Options{
		Region:       cfg.Region,
		Credentials:  aws.NewCredentialsCache(creds),
		UsePathStyle: cfg.PathStyle,
		HTTPClient:   &http.Client{Transport: tr},
		// Checksums on every request cost CPU and SeaweedFS does not need them;
		// dupproxy verifies content by digest itself.
		RequestChecksumCalculation: aws.RequestChecksumCalculationWhenRequired,
		ResponseChecksumValidation: aws.ResponseChecksumValidationWhenRequired,
		RetryMaxAttempts:           5,
	}
	if cfg.Endpoint != "" {
		opts.BaseEndpoint = aws.String(strings.TrimSuffix(cfg.Endpoint, "/"))
	}
	p := strings.Trim(cfg.Prefix, "/")
	if p != "" {
		p += "/"
	}
	return &Bucket{c: s3.New(opts), name: cfg.Bucket, prefix: p}, nil
}

// Client exposes the SDK client (tests create buckets with it).
func (b *Bucket) Client() *s3.Client { return b.c }

// Name is the bucket name.
func (b *Bucket) Name() string { return b.name }

func (b *Bucket) key(k string) *string { return aws.String(b.prefix + k) }

// CreateBucket creates the bucket if it does not exist.
func (b *Bucket) CreateBucket(ctx context.Context) error {
	_, err := b.c.CreateBucket(ctx, &s3.CreateBucketInput{Bucket: aws.String(b.name)})
	var owned *types.BucketAlreadyOwnedByYou
	var exists *types.BucketAlreadyExists
	if err != nil && !errors.As(err, &owned) && !errors.As(err, &exists) {
		return fmt.Errorf("s3: create bucket %s: %w", b.name, err)
	}
	return nil
}

func isNotFound(err error) bool {
	var nk *types.NoSuchKey
	var nf *types.NotFound
	if errors.As(err, &nk) || errors.As(err, &nf) {
		return true
	}
	var ae smithy.APIError
	return errors.As(err, &ae) && (ae.ErrorCode() == "NotFound" || ae.ErrorCode() == "NoSuchKey")
}

func isPreconditionFailed(err error) bool {
	var ae smithy.APIError
	return errors.As(err, &ae) && (ae.ErrorCode() == "PreconditionFailed" || ae.ErrorCode() == "ConditionalRequestConflict")
}

// Put stores body (size bytes, seekable so retries can rewind) under key.
// With createOnly the put carries If-None-Match: * and returns ErrExists
// when the key is taken; a server that ignores the header simply
// overwrites, which is harmless for content-addressed keys.
func (b *Bucket) Put(ctx context.Context, key string, body io.ReadSeeker, size int64, meta map[string]string, createOnly bool) error {
	in := &s3.PutObjectInput{Bucket: aws.String(b.name), Key: b.key(key), Body: body,
		ContentLength: aws.Int64(size), Metadata: meta}
	if createOnly {
		in.IfNoneMatch = aws.String("*")
	}
	_, err := b.c.PutObject(ctx, in)
	if err != nil {
		if createOnly && isPreconditionFailed(err) {
			return ErrExists
		}
		return fmt.Errorf("s3: put %s: %w", key, err)
	}
	return nil
}

// Get opens an object; the caller closes it.
func (b *Bucket) Get(ctx context.Context, key string) (io.ReadCloser, Info, error) {
	out, err := b.c.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String(b.name), Key: b.key(key)})
	if err != nil {
		if isNotFound(err) {
			return nil, Info{}, fmt.Errorf("%s: %w", key, ErrNotFound)
		}
		return nil, Info{}, fmt.Errorf("s3: get %s: %w", key, err)
	}
	return out.Body, Info{Key: key, Size: aws.ToInt64(out.ContentLength), ModTime: aws.ToTime(out.LastModified), Meta: out.Metadata}, nil
}

// GetRange opens bytes [off, off+n) of an object.
func (b *Bucket) GetRange(ctx context.Context, key string, off, n int64) (io.ReadCloser, error) {
	out, err := b.c.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String(b.name), Key: b.key(key),
		Range: aws.String(fmt.Sprintf("bytes=%d-%d", off, off+n-1))})
	if err != nil {
		if isNotFound(err) {
			return nil, fmt.Errorf("%s: %w", key, ErrNotFound)
		}
		return nil, fmt.Errorf("s3: get %s: %w", key, err)
	}
	return out.Body, nil
}

// ReadAll reads a small object.
func (b *Bucket) ReadAll(ctx context.Context, key string) ([]byte, error) {
	rc, _, err := b.Get(ctx, key)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	buf, err := io.ReadAll(rc)
	if err != nil {
		return nil, fmt.Errorf("s3: read %s: %w", key, err)
	}
	return buf, nil
}

// Head describes an object.
func (b *Bucket) Head(ctx context.Context, key string) (Info, error) {
	out, err := b.c.HeadObject(ctx, &s3.HeadObjectInput{Bucket: aws.String(b.name), Key: b.key(key)})
	if err != nil {
		if isNotFound(err) {
			return Info{}, fmt.Errorf("%s: %w", key, ErrNotFound)
		}
		return Info{}, fmt.Errorf("s3: head %s: %w", key, err)
	}
	return Info{Key: key, Size: aws.ToInt64(out.ContentLength), ModTime: aws.ToTime(out.LastModified), Meta: out.Metadata}, nil
}

// Delete removes an object; absent is not an error.
func (b *Bucket) Delete(ctx context.Context, key string) error {
	_, err := b.c.DeleteObject(ctx, &s3.DeleteObjectInput{Bucket: aws.String(b.name), Key: b.key(key)})
	if err != nil && !isNotFound(err) {
		return fmt.Errorf("s3: delete %s: %w", key, err)
	}
	return nil
}

// Touch refreshes an object's LastModified (what GC's grace period is
// measured from) by copying it onto itself.
func (b *Bucket) Touch(ctx context.Context, key string, meta map[string]string) error {
	_, err := b.c.CopyObject(ctx, &s3.CopyObjectInput{Bucket: aws.String(b.name), Key: b.key(key),
		CopySource:        aws.String(b.name + "/" + b.prefix + key),
		MetadataDirective: types.MetadataDirectiveReplace, Metadata: meta})
	if err != nil {
		if isNotFound(err) {
			return fmt.Errorf("%s: %w", key, ErrNotFound)
		}
		return fmt.Errorf("s3: touch %s: %w", key, err)
	}
	return nil
}

// List visits every object whose key starts with prefix.
func (b *Bucket) List(ctx context.Context, prefix string, fn func(Info) error) error {
	p := s3.NewListObjectsV2Paginator(b.c, &s3.ListObjectsV2Input{Bucket: aws.String(b.name), Prefix: b.key(prefix)})
	for p.HasMorePages() {
		page, err := p.NextPage(ctx)
		if err != nil {
			return fmt.Errorf("s3: list %s: %w", prefix, err)
		}
		for _, o := range page.Contents {
			k := strings.TrimPrefix(aws.ToString(o.Key), b.prefix)
			if err := fn(Info{Key: k, Size: aws.ToInt64(o.Size), ModTime: aws.ToTime(o.LastModified)}); err != nil {
				return err
			}
		}
	}
	return nil
}
