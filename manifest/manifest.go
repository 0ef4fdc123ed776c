// Package manifest reads and checks image manifests: from a registry's
// response or from a peer, a manifest is taken only with a manifest's media
// type, within the size limit, and matching its digest.
package manifest

import (
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"

	"github.com/opencontainers/go-digest"

	// Registered for digest verification.
	_ "crypto/sha256"
	_ "crypto/sha512"
)

// ErrInvalid means content is not a manifest that may be cached or served:
// wrong media type, too large, or not matching its digest.
var ErrInvalid = errors.New("manifest: invalid")

// Accept is what a node asks a registry for when it fetches a manifest by
// digest for others: every manifest and index type.
const Accept = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, " +
	"application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json, " +
	"application/vnd.docker.distribution.manifest.v1+prettyjws, application/vnd.docker.distribution.manifest.v1+json, " +
	"application/vnd.oci.artifact.manifest.v1+json, */*"

// Manifest is a checked manifest.
type Manifest struct {
	Digest    digest.Digest
	MediaType string
	Content   []byte
}

// MediaTypeOK reports whether a Content-Type names a manifest or index, the
// only content cached and served as one.
func MediaTypeOK(ct string) bool {
	mt, _, err := mime.ParseMediaType(ct)
	if err != nil {
		return false
	}
	switch mt {
	case "application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.index.v1+json",
		"application/vnd.docker.distribution.manifest.v2+json", "application/vnd.docker.distribution.manifest.list.v2+json",
		"application/vnd.docker.distribution.manifest.v1+json", "application/vnd.docker.distribution.manifest.v1+prettyjws",
		"application/vnd.oci.artifact.manifest.v1+json":
		return true
	}
	return false
}

// Read reads a registry's 200 answer to a manifest GET and checks it: its
// media type, at most limit bytes, and its content against want (when set)
// and the Docker-Content-Digest the registry sent (when it did). The
// digest is computed with want's algorithm, else the header's, else sha256.
func Read(resp *http.Response, want digest.Digest, limit int64) (Manifest, error) {
	mt := resp.Header.Get("Content-Type")
	if !MediaTypeOK(mt) {
		return Manifest{}, fmt.Errorf("%w: media type %q is not a manifest's", ErrInvalid, mt)
	}
	if resp.ContentLength > limit {
		return Manifest{}, fmt.Errorf("%w: %d bytes, larger than the %d byte limit", ErrInvalid, resp.ContentLength, limit)
	}
	content, err := io.ReadAll(io.LimitReader(resp.Body, limit+1))
	if err != nil {
		return Manifest{}, fmt.Errorf("manifest: reading: %w", err)
	}
	if int64(len(content)) > limit {
		return Manifest{}, fmt.Errorf("%w: larger than the %d byte limit", ErrInvalid, limit)
	}
	header := ParseDigest(resp.Header.Get("Docker-Content-Digest"))
	alg := digest.Canonical
	switch {
	case want != "":
		alg = want.Algorithm()
	case header != "":
		alg = header.Algorithm()
	}
	if !alg.Available() {
		return Manifest{}, fmt.Errorf("%w: digest algorithm %q", ErrInvalid, alg)
	}
	got := alg.FromBytes(content)
	if (want != "" && got != want) || (header != "" && header != got) {
		return Manifest{}, fmt.Errorf("%w: content hashes to %s, the registry said %s", ErrInvalid, got, header)
	}
	return Manifest{Digest: got, MediaType: mt, Content: content}, nil
}

// ParseDigest is a Docker-Content-Digest header's digest, "" when it is
// absent or not a valid digest (digest.Parse returns the bad string with
// its error, which must not be used).
func ParseDigest(h string) digest.Digest {
	d, err := digest.Parse(h)
	if err != nil {
		return ""
	}
	return d
}

// Check checks a manifest a peer sent for want: its media type, size and
// digest. A peer's word is taken for nothing.
func Check(want digest.Digest, mediaType string, content []byte, limit int64) (Manifest, error) {
	switch {
	case !MediaTypeOK(mediaType):
		return Manifest{}, fmt.Errorf("%w: media type %q is not a manifest's", ErrInvalid, mediaType)
	case int64(len(content)) > limit:
		return Manifest{}, fmt.Errorf("%w: %d bytes, larger than the %d byte limit", ErrInvalid, len(content), limit)
	case !want.Algorithm().Available():
		return Manifest{}, fmt.Errorf("%w: digest algorithm %q", ErrInvalid, want.Algorithm())
	case want.Algorithm().FromBytes(content) != want:
		return Manifest{}, fmt.Errorf("%w: content does not match %s", ErrInvalid, want)
	}
	return Manifest{Digest: want, MediaType: mediaType, Content: content}, nil
}
