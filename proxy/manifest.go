package proxy

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"github.com/gorilla/mux"
	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/manifest"
	"github.com/registry-proxy/registry-proxy/p2p/manifests"
	"github.com/registry-proxy/registry-proxy/proxy/access"
	"github.com/registry-proxy/registry-proxy/proxy/upstream"
)

// Manifests fetches manifests through the cluster and keeps tag
// resolutions; *manifests.Cluster is one.
type Manifests interface {
	// Get returns a manifest by digest from a member or the digest's
	// owner: manifests.ErrFetchYourself when the owner's credentials were
	// refused, manifests.ErrNotFound when no member could send it.
	Get(ctx context.Context, registry, repo string, d digest.Digest) (manifest.Manifest, string, error)
	// Record keeps a tag resolution the registry made.
	Record(t manifests.Tag)
	// Lookup returns the cluster's latest resolution of a tag.
	Lookup(ctx context.Context, registry, repo, tag string) (manifests.Tag, error)
}

// staleHeader marks an answer the cluster gave while the registry could not.
const staleHeader = "X-Registry-Proxy-Stale"

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
	if isDigestRef(ref) {
		d, err := digest.Parse(ref)
		if err != nil {
			writeError(w, http.StatusNotFound, codeManifestUnknown, "invalid manifest digest")
			return
		}
		s.manifestByDigest(w, r, name, d)
		return
	}
	if !tagPattern.MatchString(ref) {
		writeError(w, http.StatusNotFound, codeManifestUnknown, "invalid tag")
		return
	}
	s.manifestByTag(w, r, name, ref)
}

// manifestByTag resolves a tag at the registry every time, with a HEAD
// (which registries do not meter) whatever the client sent, and serves the
// manifest by digest: from the store or the cluster, so the registry sees one
// GET per manifest per cluster. While the registry cannot answer, the tag
// resolves to the cluster's last resolution within manifests.stale_if_error.
func (s *Server) manifestByTag(w http.ResponseWriter, r *http.Request, name, tag string) {
	registry := s.registry(r)
	ctx, cancel := context.WithTimeout(r.Context(), s.opts.UpstreamTimeout)
	defer cancel()
	resp, err := s.upstreamFor(r, name).Manifest(ctx, http.MethodHead, registry, name, tag, forwardHeaders(r, "Accept"))
	if err != nil {
		if upstream.Unreachable(err) && s.staleTag(w, r, name, tag, err) {
			return
		}
		s.writeUpstreamError(w, r, err, codeManifestUnknown)
		return
	}
	resp.Body.Close()
	if s.opts.Access != nil {
		s.opts.Access.Reachable(registry)
	}
	mediaType := resp.Header.Get("Content-Type")
	d, derr := digest.Parse(resp.Header.Get("Docker-Content-Digest"))
	if derr != nil || !manifest.MediaTypeOK(mediaType) {
		// No digest to serve it by (or not a manifest's type): the tag's
		// own GET, as the client asked.
		s.manifestUpstream(w, r, name, tag, "")
		return
	}
	w.Header().Set("X-Registry-Proxy-Source", "upstream")
	public := !s.nodeAuth(r, name) && r.Header.Get("Authorization") == ""
	if !public && s.opts.Access != nil {
		// Whether anyone may read it is a fact members keep for outages.
		public = s.opts.Access.Public(ctx, registry, name, tag)
	}
	if s.opts.Manifests != nil {
		s.opts.Manifests.Record(manifests.Tag{Registry: registry, Repo: name, Tag: tag, Digest: d, MediaType: mediaType,
			Size: resp.ContentLength, ResolvedAt: time.Now(), Public: public})
	}
	if s.opts.Access != nil {
		// The registry just answered this client (or this node, in access
		// mode node) for the tag, and so for the manifest it names.
		s.opts.Access.Allow(registry, name, d, access.Manifest, r.Header)
	}
	if r.Method == http.MethodHead {
		writeManifestHead(w, mediaType, d, resp.ContentLength)
		return
	}
	s.manifestByDigest(w, r, name, d)
}

// staleTag answers a tag from the cluster's last resolution while the
// registry cannot answer (err); false when there is none within
// manifests.stale_if_error, and nothing was written.
func (s *Server) staleTag(w http.ResponseWriter, r *http.Request, name, tag string, cause error) bool {
	if s.opts.Manifests == nil || s.opts.StaleIfError <= 0 {
		return false
	}
	registry := s.registry(r)
	t, err := s.opts.Manifests.Lookup(r.Context(), registry, name, tag)
	if err != nil {
		return false
	}
	age := time.Since(t.ResolvedAt)
	if age > s.opts.StaleIfError {
		s.log.Info("registry did not answer and the cluster's resolution of the tag is too old to use", "registry", registry, "repo", name, "tag", tag, "age", age.Round(time.Second), "stale_if_error", s.opts.StaleIfError)
		return false
	}
	if t.Public && s.opts.Access != nil {
		s.opts.Access.MarkPublic(registry, name, t.ResolvedAt)
	}
	if !s.allowed(w, r, name, t.Digest, access.Manifest, codeManifestUnknown) {
		return true
	}
	reason := staleReason(cause)
	s.opts.Metrics.StaleAnswer("tag", reason)
	w.Header().Set(staleHeader, fmt.Sprintf("age=%ds; reason=%s", int(age.Seconds()), reason))
	if k := registry + "/" + name + ":" + tag; !s.staleLogged.Contains(k) {
		s.staleLogged.Add(k, struct{}{})
		s.log.Warn("registry did not answer; tag resolved to the cluster's last resolution", "registry", registry, "repo", name, "tag", tag,
			"digest", t.Digest, "age", age.Round(time.Second), "reason", reason, "err", cause)
	}
	if r.Method == http.MethodHead {
		writeManifestHead(w, t.MediaType, t.Digest, t.Size)
		return true
	}
	s.manifestByDigest(w, r, name, t.Digest)
	return true
}

func staleReason(err error) string {
	var se *upstream.StatusError
	switch {
	case upstream.Throttled(err):
		return "throttled"
	case errors.As(err, &se):
		return "server_error"
	}
	return "unavailable"
}

// manifestByDigest serves a manifest by digest: from the store, else from
// the cluster (a member, or the digest's owner fetching it), else from the
// registry with the client's credentials.
func (s *Server) manifestByDigest(w http.ResponseWriter, r *http.Request, name string, d digest.Digest) {
	if mt, content, err := s.opts.Store.GetManifest(d); err == nil {
		if !s.allowed(w, r, name, d, access.Manifest, codeManifestUnknown) {
			return
		}
		s.opts.Metrics.ManifestServed("cache")
		w.Header().Set("X-Registry-Proxy-Source", "cache")
		writeManifest(w, r, mt, d, content)
		return
	}
	if s.opts.Manifests != nil {
		ctx, cancel := context.WithTimeout(r.Context(), s.opts.UpstreamTimeout)
		m, source, err := s.opts.Manifests.Get(ctx, s.registry(r), name, d)
		cancel()
		if err == nil {
			if !s.allowed(w, r, name, d, access.Manifest, codeManifestUnknown) {
				return
			}
			s.opts.Metrics.ManifestServed(source)
			w.Header().Set("X-Registry-Proxy-Source", source)
			writeManifest(w, r, m.MediaType, d, m.Content)
			return
		}
		if !errors.Is(err, manifests.ErrFetchYourself) && !errors.Is(err, manifests.ErrNotFound) {
			s.log.Warn("manifest from the cluster", "digest", d, "err", err)
		} else {
			s.log.Debug("manifest not from the cluster; from the registry", "digest", d, "err", err)
		}
	}
	s.manifestUpstream(w, r, name, d.String(), d)
}

// manifestUpstream GETs a manifest from the registry for this client (its
// own credentials, or this node's in access mode node), checks it, keeps it
// and serves it.
func (s *Server) manifestUpstream(w http.ResponseWriter, r *http.Request, name, ref string, want digest.Digest) {
	ctx, cancel := context.WithTimeout(r.Context(), s.opts.UpstreamTimeout)
	defer cancel()
	registry := s.registry(r)
	resp, err := s.upstreamFor(r, name).Manifest(ctx, r.Method, registry, name, ref, forwardHeaders(r, "Accept"))
	if err != nil {
		s.writeUpstreamError(w, r, err, codeManifestUnknown)
		return
	}
	defer resp.Body.Close()
	w.Header().Set("X-Registry-Proxy-Source", "upstream")
	if r.Method == http.MethodHead {
		mt := resp.Header.Get("Content-Type")
		upDigest := manifest.ParseDigest(resp.Header.Get("Docker-Content-Digest"))
		switch {
		case !manifest.MediaTypeOK(mt):
			s.badManifest(w, registry, name, ref, fmt.Sprintf("media type %q is not a manifest's", mt))
		case want != "" && upDigest != "" && upDigest != want:
			s.badManifest(w, registry, name, ref, fmt.Sprintf("upstream answered digest %s", upDigest))
		default:
			writeManifestHead(w, mt, upDigest, resp.ContentLength)
		}
		return
	}
	m, err := manifest.Read(resp, want, s.opts.MaxManifestSize)
	if errors.Is(err, manifest.ErrInvalid) {
		s.badManifest(w, registry, name, ref, err.Error())
		return
	}
	if err != nil {
		s.writeUpstreamError(w, r, err, codeManifestUnknown)
		return
	}
	if err := s.opts.Store.PutManifest(m.Digest, m.MediaType, m.Content); err != nil {
		s.log.Warn("caching manifest", "digest", m.Digest, "err", err)
	}
	if s.opts.Access != nil {
		// This client read it upstream just now (with its own credentials,
		// or with this node's in access mode node).
		s.opts.Access.Allow(registry, name, m.Digest, access.Manifest, r.Header)
	}
	s.opts.Metrics.ManifestServed("upstream")
	writeManifest(w, r, m.MediaType, m.Digest, m.Content)
}

func (s *Server) badManifest(w http.ResponseWriter, registry, name, ref, why string) {
	s.log.Error("refusing manifest from upstream", "registry", registry, "repo", name, "reference", ref, "reason", why)
	writeError(w, http.StatusBadGateway, codeManifestInvalid, "upstream manifest refused: "+why)
}

func writeManifestHead(w http.ResponseWriter, mediaType string, d digest.Digest, size int64) {
	h := w.Header()
	h.Set("Content-Type", mediaType)
	if d != "" {
		h.Set("Docker-Content-Digest", d.String())
		h.Set("Etag", `"`+d.String()+`"`)
	}
	if size >= 0 {
		h.Set("Content-Length", strconv.FormatInt(size, 10))
	}
	w.WriteHeader(http.StatusOK)
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
