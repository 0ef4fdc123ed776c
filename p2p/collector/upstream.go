package collector

import (
	"context"
	"io"
	"net/http"

	"github.com/opencontainers/go-digest"
)

// BlobSource reads byte ranges of blobs from a registry; *upstream.Client is one.
type BlobSource interface {
	Blob(ctx context.Context, registry, repo string, d digest.Digest, off, n int64, hdr http.Header) (io.ReadCloser, bool, error)
}

// UpstreamID names the upstream registry among a job's parents.
const UpstreamID = "upstream"

type upstreamParent struct {
	src            BlobSource
	registry, repo string
	digest         digest.Digest
	header         http.Header
}

// NewUpstreamParent returns the registry as a parent of one blob, fetched with
// the client's credentials.
func NewUpstreamParent(src BlobSource, registry, repo string, d digest.Digest, hdr http.Header) Parent {
	return &upstreamParent{src: src, registry: registry, repo: repo, digest: d, header: hdr}
}

func (p *upstreamParent) ID() string { return UpstreamID }

func (p *upstreamParent) Fetch(ctx context.Context, _ int, off, n int64) (io.ReadCloser, error) {
	body, whole, err := p.src.Blob(ctx, p.registry, p.repo, p.digest, off, n, p.header)
	if err != nil {
		return nil, err
	}
	if whole {
		return nil, &ErrWhole{Body: body}
	}
	return body, nil
}
