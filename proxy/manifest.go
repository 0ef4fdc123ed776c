package proxy

import (
	"context"
	"fmt"
	"io"
	"mime"
	"net/http"

	"github.com/gorilla/mux"
	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/proxy/access"
)

func (s *Server) manifest(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		s.unsupported(w, r)
		return
	}
	name, ok := s.repo(w, r)
	if !ok {
		return
	}
	ref := mux.Vars(r)["reference"]
	var want digest.Digest
	if isDigestRef(ref) {
		d, err := digest.Parse(ref)
		if err != nil {
			writeError(w, http.StatusNotFound, codeManifestUnknown, "invalid manifest digest")
			return
		}
		want = d
		if mt, content, err := s.opts.Store.GetManifest(d); err == nil {
			if !s.allowed(w, r, name, d, access.Manifest, codeManifestUnknown) {
				return
			}
			w.Header().Set("X-Registry-Proxy-Source", "cache")
			writeManifest(w, r, mt, d, content)
			return
		}
	} else if !tagPattern.MatchString(ref) {
		writeError(w, http.StatusNotFound, codeManifestUnknown, "invalid tag")
		return
	}

	// Tags always resolve upstream, with the client's Accept and credentials.
	ctx, cancel := context.WithTimeout(r.Context(), s.opts.UpstreamTimeout)
	defer cancel()
	registry := s.registry(r)
	resp, err := s.upstreamFor(r, name).Manifest(ctx, r.Method, registry, name, ref, forwardHeaders(r, "Accept"))
	if err != nil {
		s.writeUpstreamError(w, r, err, codeManifestUnknown)
		return
	}
	defer resp.Body.Close()
	mediaType := resp.Header.Get("Content-Type")
	upDigest, _ := digest.Parse(resp.Header.Get("Docker-Content-Digest"))
	w.Header().Set("X-Registry-Proxy-Source", "upstream")
	if !manifestMediaType(mediaType) {
		s.badManifest(w, registry, name, ref, fmt.Sprintf("media type %q is not a manifest's", mediaType))
		return
	}

	if r.Method == http.MethodHead {
		if want != "" && upDigest != "" && upDigest != want {
			s.badManifest(w, registry, name, ref, fmt.Sprintf("upstream answered digest %s", upDigest))
			return
		}
		h := w.Header()
		h.Set("Content-Type", mediaType)
		if upDigest != "" {
			h.Set("Docker-Content-Digest", upDigest.String())
		}
		if resp.ContentLength >= 0 {
			h.Set("Content-Length", contentLength(resp.ContentLength))
		}
		w.WriteHeader(http.StatusOK)
		return
	}

	content, err := io.ReadAll(io.LimitReader(resp.Body, s.opts.MaxManifestSize+1))
	if err != nil {
		s.writeUpstreamError(w, r, err, codeManifestUnknown)
		return
	}
	if int64(len(content)) > s.opts.MaxManifestSize {
		s.badManifest(w, registry, name, ref, fmt.Sprintf("larger than the %d byte limit", s.opts.MaxManifestSize))
		return
	}
	alg := digest.Canonical
	switch {
	case want != "":
		alg = want.Algorithm()
	case upDigest != "":
		alg = upDigest.Algorithm()
	}
	got := alg.FromBytes(content)
	if (want != "" && got != want) || (upDigest != "" && upDigest != got) {
		s.badManifest(w, registry, name, ref, fmt.Sprintf("content hashes to %s, upstream said %s", got, upDigest))
		return
	}
	if err := s.opts.Store.PutManifest(got, mediaType, content); err != nil {
		s.log.Warn("caching manifest", "digest", got, "err", err)
	}
	if s.opts.Access != nil {
		// This client read it upstream just now (with its own credentials,
		// or with this node's in access mode node).
		s.opts.Access.Allow(registry, name, got, access.Manifest, r.Header)
	}
	writeManifest(w, r, mediaType, got, content)
}

// manifestMediaType reports whether an upstream's Content-Type names a
// manifest or index, the only content cached and served as one.
func manifestMediaType(ct string) bool {
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

func (s *Server) badManifest(w http.ResponseWriter, registry, name, ref, why string) {
	s.log.Error("refusing manifest from upstream", "registry", registry, "repo", name, "reference", ref, "reason", why)
	writeError(w, http.StatusBadGateway, codeManifestInvalid, "upstream manifest refused: "+why)
}

func writeManifest(w http.ResponseWriter, r *http.Request, mediaType string, d digest.Digest, content []byte) {
	h := w.Header()
	h.Set("Content-Type", mediaType)
	h.Set("Docker-Content-Digest", d.String())
	h.Set("Content-Length", contentLength(int64(len(content))))
	h.Set("Etag", `"`+d.String()+`"`)
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodGet {
		w.Write(content)
	}
}
