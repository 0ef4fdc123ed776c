// Package preheat spreads an image's blobs across the cluster before a
// rollout: it resolves each image to its platform manifest's config and
// layers (Resolve), then has every chosen node fetch every blob at once,
// with its own credentials, through the swarm, so that the upstream sends
// about one copy of each and the nodes trade the rest (Run). The admin
// listener's POST /preheat serves it (Handler); `registry-proxy preheat`
// is its client.
package preheat

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strings"

	"github.com/containerd/platforms"
	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// ErrResolve: an image reference or platform is invalid, or the image has
// no manifest for the platform (an upstream's failure is not this).
var ErrResolve = errors.New("preheat: cannot resolve image")

// Manifests fetch manifests from the upstream; *upstream.Client is one.
type Manifests interface {
	Manifest(ctx context.Context, method, registry, repo, ref string, hdr http.Header) (*http.Response, error)
}

// Blob is one blob to preheat.
type Blob struct {
	Image     string `json:"image"`
	Registry  string `json:"registry"`
	Repo      string `json:"repository"`
	Digest    string `json:"digest"`
	Size      int64  `json:"size"`
	MediaType string `json:"mediaType"`
}

// maxManifest bounds a manifest read while resolving.
const maxManifest = 4 << 20

var accept = strings.Join([]string{
	ocispec.MediaTypeImageIndex, ocispec.MediaTypeImageManifest,
	"application/vnd.docker.distribution.manifest.list.v2+json",
	"application/vnd.docker.distribution.manifest.v2+json",
}, ", ")

// manifest is the part of an index or image manifest that preheat reads.
type manifest struct {
	MediaType string               `json:"mediaType"`
	Manifests []ocispec.Descriptor `json:"manifests"`
	Config    *ocispec.Descriptor  `json:"config"`
	Layers    []ocispec.Descriptor `json:"layers"`
}

// Resolve returns an image's blobs for a platform ("os/arch[/variant]"):
// an index is resolved to the manifest of that platform; the blobs are its
// config and layers. Manifests fetched by digest are checked against it.
func Resolve(ctx context.Context, src Manifests, image, platform string) ([]Blob, error) {
	named, err := reference.ParseNormalizedNamed(image)
	if err != nil {
		return nil, fmt.Errorf("%w %q: %w", ErrResolve, image, err)
	}
	named = reference.TagNameOnly(named)
	registry, repo := reference.Domain(named), reference.Path(named)
	ref := ""
	switch r := named.(type) {
	case reference.Digested:
		ref = r.Digest().String()
	case reference.Tagged:
		ref = r.Tag()
	}
	want, err := platforms.Parse(platform)
	if err != nil {
		return nil, fmt.Errorf("%w: platform %q: %w", ErrResolve, platform, err)
	}
	match := platforms.OnlyStrict(want)
	for range 3 { // an index, then its manifest
		m, err := fetch(ctx, src, registry, repo, ref)
		if err != nil {
			return nil, fmt.Errorf("preheat: resolving %s: %w", image, err)
		}
		if m.Config != nil {
			blobs := []Blob{{Image: image, Registry: registry, Repo: repo, Digest: m.Config.Digest.String(), Size: m.Config.Size, MediaType: m.Config.MediaType}}
			for _, l := range m.Layers {
				if len(l.URLs) > 0 {
					continue // a foreign layer: not in the registry
				}
				blobs = append(blobs, Blob{Image: image, Registry: registry, Repo: repo, Digest: l.Digest.String(), Size: l.Size, MediaType: l.MediaType})
			}
			for _, b := range blobs {
				if _, err := digest.Parse(b.Digest); err != nil || b.Size <= 0 {
					return nil, fmt.Errorf("%w %s: blob %q of size %d", ErrResolve, image, b.Digest, b.Size)
				}
			}
			return blobs, nil
		}
		var have []string
		ref = ""
		for _, d := range m.Manifests {
			if d.Platform != nil && match.Match(*d.Platform) {
				ref = d.Digest.String()
				break
			}
			if d.Platform != nil {
				have = append(have, platforms.Format(*d.Platform))
			}
		}
		if ref == "" {
			return nil, fmt.Errorf("%w %s: no manifest for %s (the index has %s)", ErrResolve, image, platforms.Format(want), strings.Join(have, ", "))
		}
	}
	return nil, fmt.Errorf("%w %s: indexes nested too deep", ErrResolve, image)
}

// fetch reads one manifest or index, checked against ref when ref is a
// digest.
func fetch(ctx context.Context, src Manifests, registry, repo, ref string) (manifest, error) {
	resp, err := src.Manifest(ctx, http.MethodGet, registry, repo, ref, http.Header{"Accept": {accept}})
	if err != nil {
		return manifest{}, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxManifest+1))
	if err != nil {
		return manifest{}, fmt.Errorf("reading manifest %s: %w", ref, err)
	}
	if len(body) > maxManifest {
		return manifest{}, fmt.Errorf("manifest %s larger than %d bytes", ref, maxManifest)
	}
	if d, err := digest.Parse(ref); err == nil && d.Algorithm().Available() && d.Algorithm().FromBytes(body) != d {
		return manifest{}, fmt.Errorf("manifest %s does not match its digest", ref)
	}
	var m manifest
	if err := json.Unmarshal(body, &m); err != nil {
		return manifest{}, fmt.Errorf("manifest %s: %w", ref, err)
	}
	if m.MediaType == "" {
		m.MediaType, _, _ = mime.ParseMediaType(resp.Header.Get("Content-Type"))
	}
	if m.Config == nil && len(m.Manifests) == 0 {
		return manifest{}, fmt.Errorf("manifest %s (%s) is neither an image manifest nor an index", ref, m.MediaType)
	}
	return m, nil
}
