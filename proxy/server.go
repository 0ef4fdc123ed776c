// Package proxy is the pull side of the OCI distribution API that containerd,
// crictl and dockerd use as their registry mirror.
package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/pprof"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/distribution/reference"
	"github.com/gorilla/mux"
	"github.com/opencontainers/go-digest"

	// Registered for digest verification.
	_ "crypto/sha256"
	_ "crypto/sha512"

	"github.com/registry-proxy/registry-proxy/blobstore"
	"github.com/registry-proxy/registry-proxy/internal/ttlcache"
	"github.com/registry-proxy/registry-proxy/metrics"
	"github.com/registry-proxy/registry-proxy/proxy/access"
	"github.com/registry-proxy/registry-proxy/proxy/upstream"
	"github.com/registry-proxy/registry-proxy/task"
)

// Options configure a Server.
type Options struct {
	Upstream *upstream.Client
	// NodeUpstream fetches with this node's own credentials, for the
	// repositories Policy puts in access mode node; nil: Upstream.
	NodeUpstream *upstream.Client
	// Policy says whose credentials decide, per registry; nil: the
	// client's own, everywhere.
	Policy *access.Policy
	// Manifests fetches manifests through the cluster and keeps tag
	// resolutions; nil: from the registry alone.
	Manifests Manifests
	// StaleIfError is how old a tag resolution may be to answer for a
	// registry that cannot (manifests.stale_if_error); zero: never.
	StaleIfError time.Duration
	Store        *blobstore.Store
	Tasks        *task.Manager
	// DefaultRegistry serves requests without ns= (dockerd's).
	DefaultRegistry string
	// MaxManifestSize refuses larger manifests from the upstream.
	MaxManifestSize int64
	// UpstreamTimeout bounds a manifest or HEAD request upstream.
	UpstreamTimeout time.Duration
	// WriteStall cuts off a client that takes no bytes for this long.
	WriteStall time.Duration
	// Access checks that a client may read cached content or content from
	// peers; nil serves it to every client (access.check = false).
	Access *access.Checker
	// Ready says whether the node is ready for traffic, and why not; nil is
	// always ready.
	Ready func() (bool, string)
	// Members lists the cluster's live nodes for /debug/members; may be nil.
	Members func() any
	// Running lists the downloads in flight for /debug/tasks; may be nil.
	Running func() []task.Stats
	// Preheat serves POST /preheat on the admin listener; nil: 404.
	Preheat http.Handler
	// Metrics counts requests and bytes served from the cache, and is
	// served on /metrics; may be nil.
	Metrics *metrics.Metrics
	// Pprof serves net/http/pprof under /debug/pprof/ on the admin listener.
	Pprof  bool
	Logger *slog.Logger
}

// Server serves the mirror API.
type Server struct {
	opts     Options
	log      *slog.Logger
	copyBufs chan *[]byte // the loopback copy buffers: bigBuffers of 1 MiB
	// refusalsLogged bounds the log lines about private content refused to
	// one per registry, mode and reason an hour.
	refusalsLogged *ttlcache.Cache[refusal, struct{}]
	// staleLogged bounds the log lines about tags answered from the
	// cluster to one per tag an hour.
	staleLogged *ttlcache.Cache[string, struct{}]
}

// New returns a server.
func New(opts Options) *Server {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.DefaultRegistry == "" {
		opts.DefaultRegistry = "docker.io"
	}
	if opts.MaxManifestSize <= 0 {
		opts.MaxManifestSize = 4 << 20
	}
	if opts.UpstreamTimeout <= 0 {
		opts.UpstreamTimeout = time.Minute
	}
	s := &Server{opts: opts, log: opts.Logger.With("component", "proxy"), copyBufs: make(chan *[]byte, bigBuffers),
		refusalsLogged: ttlcache.New[refusal, struct{}](256, time.Hour), staleLogged: ttlcache.New[string, struct{}](1024, time.Hour)}
	for range bigBuffers {
		b := make([]byte, 1<<20)
		s.copyBufs <- &b
	}
	return s
}

// tagPattern is a whole tag by distribution/reference's grammar.
var tagPattern = regexp.MustCompile(`^` + reference.TagRegexp.String() + `$`)

// Handler returns the HTTP handler.
func (s *Server) Handler() http.Handler {
	r := mux.NewRouter()
	r.UseEncodedPath()
	r.HandleFunc("/v2", s.base)
	r.HandleFunc("/v2/", s.base)
	r.HandleFunc("/v2/{name:.+}/manifests/{reference}", s.manifest)
	r.HandleFunc("/v2/{name:.+}/blobs/uploads/{rest:.*}", s.unsupported)
	r.HandleFunc("/v2/{name:.+}/blobs/{digest}", s.blob)
	r.HandleFunc("/healthz", healthz)
	r.PathPrefix("/v2/").HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, codeUnsupported, "not served by this mirror")
	})
	r.NotFoundHandler = http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		writeError(w, http.StatusNotFound, codeUnsupported, "not found")
	})
	return s.logRequests(r)
}

// AdminHandler serves the operators' endpoints, for the admin listener
// only: what they tell (members, where blobs came from) is for no client.
func (s *Server) AdminHandler() http.Handler {
	r := mux.NewRouter()
	r.HandleFunc("/debug/blobs/{digest}", s.blobStats).Methods(http.MethodGet)
	r.HandleFunc("/debug/members", func(w http.ResponseWriter, _ *http.Request) {
		var m any = []any{}
		if s.opts.Members != nil {
			m = s.opts.Members()
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(m)
	}).Methods(http.MethodGet)
	r.HandleFunc("/debug/tasks", func(w http.ResponseWriter, _ *http.Request) {
		running := []task.Stats{}
		if s.opts.Running != nil {
			running = s.opts.Running()
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(running)
	}).Methods(http.MethodGet)
	r.Handle("/metrics", s.opts.Metrics.Handler())
	if s.opts.Preheat != nil {
		r.Handle("/preheat", s.opts.Preheat)
	}
	if s.opts.Pprof {
		r.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		r.HandleFunc("/debug/pprof/profile", pprof.Profile)
		r.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		r.HandleFunc("/debug/pprof/trace", pprof.Trace)
		r.PathPrefix("/debug/pprof/").HandlerFunc(pprof.Index)
	}
	r.HandleFunc("/healthz", healthz)
	r.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if s.opts.Ready != nil {
			if ok, why := s.opts.Ready(); !ok {
				http.Error(w, why, http.StatusServiceUnavailable)
				return
			}
		}
		io.WriteString(w, "ready\n")
	})
	return r
}

func healthz(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok\n") }

// registry is the upstream a request is for: ns= as containerd sends it, else
// the default (dockerd sends no ns).
func (s *Server) registry(r *http.Request) string {
	if ns := r.URL.Query().Get("ns"); ns != "" {
		return ns
	}
	return s.opts.DefaultRegistry
}

// forwardHeaders is what goes upstream from the client's request.
func forwardHeaders(r *http.Request, names ...string) http.Header {
	h := http.Header{}
	for _, k := range append(names, "Authorization") {
		if v := r.Header.Values(k); len(v) > 0 {
			h[http.CanonicalHeaderKey(k)] = v
		}
	}
	return h
}

func (s *Server) base(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		s.unsupported(w, r)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), s.opts.UpstreamTimeout)
	defer cancel()
	// The upstream's challenge is what dockerd authenticates with; a
	// registry in access mode node answers with this node's credentials.
	resp, err := s.opts.Upstream.Ping(ctx, s.registry(r), forwardHeaders(r))
	if err == nil {
		resp.Body.Close()
		if resp.StatusCode == http.StatusUnauthorized && !s.opts.Policy.NodeRegistry(s.registry(r)) {
			s.writeUpstreamError(w, r, &upstream.StatusError{Code: resp.StatusCode, Header: resp.Header}, codeUnauthorized)
			return
		}
	} else {
		// Cached content can still be served; the pull decides.
		s.log.Warn("upstream ping failed", "registry", s.registry(r), "err", err)
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", "2")
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodGet {
		io.WriteString(w, "{}")
	}
}

func (s *Server) unsupported(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Allow", "GET, HEAD")
	writeError(w, http.StatusMethodNotAllowed, codeUnsupported, "this mirror is read-only")
}

// repo validates the repository name in the path and the registry in ns=.
func (s *Server) repo(w http.ResponseWriter, r *http.Request) (string, bool) {
	name := mux.Vars(r)["name"]
	if !upstream.ValidRepository(name) {
		writeError(w, http.StatusBadRequest, codeNameInvalid, "invalid repository name")
		return "", false
	}
	if _, err := s.opts.Upstream.BaseURL(s.registry(r)); err != nil {
		// Without a connection: the client falls back to its next host.
		s.writeUpstreamError(w, r, err, codeNameUnknown)
		return "", false
	}
	return name, true
}

// upstreamFor is the client that asks the registry for repo on r's behalf:
// with r's own credentials, or with this node's where the access mode is
// node.
func (s *Server) upstreamFor(r *http.Request, repo string) *upstream.Client {
	if s.nodeAuth(r, repo) {
		return s.opts.NodeUpstream
	}
	return s.opts.Upstream
}

// nodeAuth reports whether r reads repo with this node's credentials.
func (s *Server) nodeAuth(r *http.Request, repo string) bool {
	return s.opts.NodeUpstream != nil && s.opts.Policy.Node(s.registry(r), repo)
}

// Reasons private content was refused, a metric label.
const (
	refusedNoCredentials = "no_credentials"
	refusedRefused       = "refused"
	refusedError         = "error"
)

type refusal struct{ registry, mode, reason string }

// privateRefused counts, and logs once an hour per registry, mode and
// reason, a client refused content the registry keeps private: containerd
// then pulls it from the registry itself, past the cluster, which an
// operator should know.
func (s *Server) privateRefused(r *http.Request, reason string) {
	registry, repo := s.registry(r), mux.Vars(r)["name"]
	mode := s.opts.Policy.Mode(registry, repo)
	if reason == refusedRefused && mode == access.ClientMode && r.Header.Get("Authorization") == "" {
		reason = refusedNoCredentials
	}
	s.opts.Metrics.PrivateRefused(string(mode), reason)
	k := refusal{registry, string(mode), reason}
	if s.refusalsLogged.Contains(k) {
		return
	}
	s.refusalsLogged.Add(k, struct{}{})
	attrs := []any{"registry", registry, "repo", repo, "access_mode", mode, "reason", reason, "remote", r.RemoteAddr}
	switch {
	case reason == refusedNoCredentials:
		s.log.Warn("private content refused to a client without credentials; it pulls from the registry itself, past the cluster. "+
			"kubelet's pulls never carry credentials to a mirror: set access.registries mode = \"node\" for this registry to serve them with this node's credentials (docs/operator-guide.md, private registries)", attrs...)
	case reason == refusedError:
		s.log.Warn("private content refused: the registry could not be asked whether this client may read it; it pulls from the registry itself", attrs...)
	case mode == access.NodeMode:
		s.log.Warn("private content refused: the registry refused this node's credentials (upstream.credentials, docker_config, credential_providers); clients pull from the registry itself, past the cluster", attrs...)
	default:
		s.log.Warn("private content refused: the registry refused the client's credentials; it pulls from the registry itself", attrs...)
	}
}

// allowed checks that the client may read d of repo before content it did
// not fetch upstream itself reaches it; a refusal is answered as the
// upstream answered it (401 with its challenge, 403, 404).
func (s *Server) allowed(w http.ResponseWriter, r *http.Request, repo string, d digest.Digest, kind access.Kind, unknown string) bool {
	if s.opts.Access == nil {
		return true
	}
	err := s.opts.Access.Check(r.Context(), s.registry(r), repo, d, kind, r.Header)
	if err == nil {
		return true
	}
	s.log.Info("access refused", "registry", s.registry(r), "repo", repo, "digest", d, "remote", r.RemoteAddr, "anonymous", r.Header.Get("Authorization") == "", "err", err)
	if se := (*upstream.StatusError)(nil); !errors.As(err, &se) {
		// A refusal is counted where it is answered, below.
		s.privateRefused(r, refusedError)
	}
	s.writeUpstreamError(w, r, err, unknown)
	return false
}

func (s *Server) blobStats(w http.ResponseWriter, r *http.Request) {
	d, err := digest.Parse(mux.Vars(r)["digest"])
	if err != nil {
		writeError(w, http.StatusBadRequest, codeDigestInvalid, err.Error())
		return
	}
	st, ok := s.opts.Tasks.Stats(d)
	if !ok {
		size, err := s.opts.Store.Stat(d)
		if err != nil {
			writeError(w, http.StatusNotFound, codeBlobUnknown, "no record of this blob")
			return
		}
		st = task.Stats{Digest: d, Size: size, State: "cached", Sources: map[string]int64{}}
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(st)
}

// statusRecorder remembers the status and byte count for the access log.
type statusRecorder struct {
	http.ResponseWriter
	status int
	bytes  int64
}

func (sr *statusRecorder) WriteHeader(code int) {
	if sr.status == 0 {
		sr.status = code
	}
	sr.ResponseWriter.WriteHeader(code)
}

func (sr *statusRecorder) Write(b []byte) (int, error) {
	if sr.status == 0 {
		sr.status = http.StatusOK
	}
	n, err := sr.ResponseWriter.Write(b)
	sr.bytes += int64(n)
	return n, err
}

// ReadFrom keeps sendfile working through the recorder.
func (sr *statusRecorder) ReadFrom(r io.Reader) (int64, error) {
	if sr.status == 0 {
		sr.status = http.StatusOK
	}
	n, err := io.Copy(sr.ResponseWriter, r)
	sr.bytes += n
	return n, err
}

func (sr *statusRecorder) Unwrap() http.ResponseWriter { return sr.ResponseWriter }

func (s *Server) logRequests(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		w.Header().Set("Docker-Distribution-API-Version", "registry/2.0")
		sr := &statusRecorder{ResponseWriter: w}
		defer func() {
			p := recover()
			status := sr.status
			if p != nil {
				status = -1 // aborted
			}
			s.opts.Metrics.Request(requestKind(r.URL.Path), r.Method, status)
			if src := w.Header().Get("X-Registry-Proxy-Source"); src == metrics.SourceCache || src == metrics.SourceContainerd {
				s.opts.Metrics.BlobBytes(src, sr.bytes)
			}
			s.log.Log(r.Context(), logLevel(status), "request",
				"method", r.Method, "path", r.URL.Path, "ns", r.URL.Query().Get("ns"),
				"range", r.Header.Get("Range"), "status", status, "bytes", sr.bytes,
				"duration", time.Since(start).Round(time.Microsecond), "remote", r.RemoteAddr)
			if p != nil {
				panic(p)
			}
		}()
		next.ServeHTTP(sr, r)
	})
}

// requestKind is a request's route, a label of bounded cardinality.
func requestKind(path string) string {
	switch {
	case path == "/v2" || path == "/v2/":
		return "base"
	case strings.Contains(path, "/manifests/"):
		return "manifest"
	case strings.Contains(path, "/blobs/"):
		return "blob"
	}
	return "other"
}

func isDigestRef(ref string) bool { return strings.Contains(ref, ":") }

func contentLength(n int64) string { return strconv.FormatInt(n, 10) }
