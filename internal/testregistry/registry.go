// Package testregistry runs a real OCI registry (go-containerregistry's
// pkg/registry) on loopback for tests, benchmarks and the demo, with knobs
// for the upstream behaviours a mirror must survive: pacing per connection,
// ignoring Range, corrupting blob bytes, redirecting blobs to an "object
// store" path, and being down. It counts the blob bytes it sends.
//
// As Docker Hub meters and refuses, it also counts manifest GETs and HEADs,
// answers 429 TOOMANYREQUESTS past a pull limit (SetManifestGetLimit), and
// can be unreachable in the ways a registry outage looks to a client
// (SetOutage: refused, reset, hanging connections). Some repositories can be
// private while the rest is public (SetRepoCredentials). ControlHandler
// serves these knobs over HTTP for a registry running in another process.
package testregistry

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"maps"
	"net"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"golang.org/x/time/rate"
)

// Options configure a Registry.
type Options struct {
	// Addr to listen on; 127.0.0.1:0 when empty.
	Addr string
	// Listener, when set, is used instead of Addr. SetOutage("refuse")
	// closes it and listens again on its address with net.Listen.
	Listener net.Listener
}

// Registry is a running test registry.
type Registry struct {
	URL  string // http://host:port
	Host string // host:port

	srv   *http.Server
	ln    net.Listener
	token atomic.Pointer[string]
	// creds, when set, are demanded: at the token realm in token mode,
	// else as basic auth on every request.
	creds atomic.Pointer[[2]string]
	blobs registry.BlobHandler
	inner http.Handler // the registry itself, without the knobs
	wg    sync.WaitGroup

	blobBytes   atomic.Int64
	blobGets    atomic.Int64
	blobHeads   atomic.Int64 // blob HEADs answered, found or not
	lastWrite   atomic.Int64 // unix ns of the last blob bytes written
	redirected  atomic.Int64
	pace        atomic.Int64 // bytes/s per blob response, 0 = unpaced
	down        atomic.Bool
	ignoreRange atomic.Bool
	corrupt     atomic.Bool
	redirect    atomic.Bool

	mu      sync.Mutex
	perBlob map[string]int64

	// Manifests: what Docker Hub meters.
	manifestGets  atomic.Int64
	manifestHeads atomic.Int64
	tooMany       atomic.Int64
	perManifest   map[string]int64 // GETs answered, by "repo:tag" or "repo@digest"
	getsByClient  map[string]int64 // GETs answered, by client address (as Docker Hub meters)
	tooManyBy     map[string]int64 // 429s, by client address
	limit         int64            // manifest GETs allowed since the limit was set, 0: none
	window        int64            // manifest GETs since the limit was set
	retryAfter    time.Duration
	repoCreds     map[string][2]string // private repositories

	// Outage: the listener and the connections it accepted.
	lnMu     sync.Mutex
	outage   atomic.Pointer[string]
	conns    map[net.Conn]struct{}
	held     map[net.Conn]struct{} // accepted in "hang" mode, never answered
	cut      atomic.Int64          // connections refused by reset or cut by an outage
	closed   bool
	outageLn net.Listener // nil while refusing
}

var (
	blobPath     = regexp.MustCompile(`^/v2/(.+)/blobs/(sha256:[a-f0-9]{64})$`)
	manifestPath = regexp.MustCompile(`^/v2/(.+)/manifests/([^/]+)$`)
	repoPath     = regexp.MustCompile(`^/v2/(.+)/(?:manifests|blobs|tags)/`)
)

// Outage modes for SetOutage.
const (
	OutageNone = ""
	// OutageRefuse closes the listener: connections are refused.
	OutageRefuse = "refuse"
	// OutageClose accepts connections and resets them at once.
	OutageClose = "close"
	// OutageHang accepts connections and never answers on them.
	OutageHang = "hang"
)

// TooManyRequestsBody is the body of a 429, as Docker Hub sends it.
const TooManyRequestsBody = `{"errors":[{"code":"TOOMANYREQUESTS","message":"You have reached your pull rate limit"}]}`

// Start starts a registry.
func Start(opts Options) (*Registry, error) {
	ln := opts.Listener
	if ln == nil {
		addr := opts.Addr
		if addr == "" {
			addr = "127.0.0.1:0"
		}
		var err error
		if ln, err = net.Listen("tcp", addr); err != nil {
			return nil, fmt.Errorf("testregistry: %w", err)
		}
	}
	r := &Registry{
		URL:          "http://" + ln.Addr().String(),
		Host:         ln.Addr().String(),
		ln:           ln,
		blobs:        registry.NewInMemoryBlobHandler(),
		perBlob:      map[string]int64{},
		perManifest:  map[string]int64{},
		getsByClient: map[string]int64{},
		tooManyBy:    map[string]int64{},
		retryAfter:   time.Minute,
		repoCreds:    map[string][2]string{},
		conns:        map[net.Conn]struct{}{},
		held:         map[net.Conn]struct{}{},
	}
	r.inner = registry.New(registry.WithBlobHandler(r.blobs), registry.Logger(log.New(io.Discard, "", 0)))
	r.srv = &http.Server{Handler: r.wrap(r.inner), ReadHeaderTimeout: 10 * time.Second, ConnState: r.connState}
	r.outageLn = &outageListener{Listener: ln, r: r}
	r.serve(r.outageLn)
	return r, nil
}

func (r *Registry) serve(ln net.Listener) {
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		r.srv.Serve(ln)
	}()
}

// Close stops the registry.
func (r *Registry) Close() error {
	r.lnMu.Lock()
	r.closed = true
	for c := range r.held {
		c.Close()
	}
	r.held = map[net.Conn]struct{}{}
	r.lnMu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := r.srv.Shutdown(ctx)
	if err != nil {
		r.srv.Close()
	}
	r.wg.Wait()
	return err
}

// SetPace limits each blob response to bytesPerSec (0: unlimited), as object
// storage behind real registries paces each connection.
func (r *Registry) SetPace(bytesPerSec int64) { r.pace.Store(bytesPerSec) }

// SetToken makes the registry demand "Authorization: Bearer <token>"
// (empty: no auth), challenging with a token realm at /token that hands it out.
func (r *Registry) SetToken(token string) { r.token.Store(&token) }

// SetCredentials makes the registry private: with a token (SetToken) the
// realm hands it out only for these basic credentials; without one every
// request needs them as basic auth. Empty user: public again.
func (r *Registry) SetCredentials(user, pass string) {
	if user == "" {
		r.creds.Store(nil)
		return
	}
	r.creds.Store(&[2]string{user, pass})
}

func (r *Registry) credsOK(req *http.Request) bool {
	c := r.creds.Load()
	if c == nil {
		return true
	}
	u, p, ok := req.BasicAuth()
	return ok && u == c[0] && p == c[1]
}

// SetDown makes every request fail with 503 (true) or work again.
func (r *Registry) SetDown(v bool) { r.down.Store(v) }

// SetIgnoreRange makes blob GETs answer 200 with the whole blob.
func (r *Registry) SetIgnoreRange(v bool) { r.ignoreRange.Store(v) }

// SetCorrupt flips a byte in every blob response.
func (r *Registry) SetCorrupt(v bool) { r.corrupt.Store(v) }

// SetRedirect sends blob GETs to a signed "object storage" URL with a 307.
func (r *Registry) SetRedirect(v bool) { r.redirect.Store(v) }

// BlobBytes is the number of blob bytes sent so far.
func (r *Registry) BlobBytes() int64 { return r.blobBytes.Load() }

// LastBlobWrite is when blob bytes were last written to a client (the zero
// time if none since the counters were reset); with the kernel's socket
// buffer, a little before the last of them left the host.
func (r *Registry) LastBlobWrite() time.Time {
	if ns := r.lastWrite.Load(); ns != 0 {
		return time.Unix(0, ns)
	}
	return time.Time{}
}

// BlobGets is the number of blob GET requests answered with content.
func (r *Registry) BlobGets() int64 { return r.blobGets.Load() }

// Redirects is the number of blob GETs answered with a redirect.
func (r *Registry) Redirects() int64 { return r.redirected.Load() }

// BytesOf is the number of bytes of one blob sent so far.
func (r *Registry) BytesOf(digest string) int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.perBlob[digest]
}

// ResetCounters zeroes the byte and request counters (manifest GETs, HEADs
// and 429s included; a pull limit's count goes on).
func (r *Registry) ResetCounters() {
	r.blobBytes.Store(0)
	r.blobGets.Store(0)
	r.blobHeads.Store(0)
	r.lastWrite.Store(0)
	r.redirected.Store(0)
	r.manifestGets.Store(0)
	r.manifestHeads.Store(0)
	r.tooMany.Store(0)
	r.cut.Store(0)
	r.mu.Lock()
	r.perBlob = map[string]int64{}
	r.perManifest = map[string]int64{}
	r.getsByClient = map[string]int64{}
	r.tooManyBy = map[string]int64{}
	r.mu.Unlock()
}

// SetManifestGetLimit is Docker Hub's pull limit: from now on n manifest
// GETs (by tag or by digest) are answered, and every further one gets 429
// TOOMANYREQUESTS with a Retry-After (SetRetryAfter) until the limit is set
// again. HEADs are neither counted nor refused. 0: no limit.
func (r *Registry) SetManifestGetLimit(n int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.limit, r.window = int64(max(n, 0)), 0
}

// SetRetryAfter sets the Retry-After of a 429 (whole seconds, at least 1;
// a minute by default).
func (r *Registry) SetRetryAfter(d time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.retryAfter = d
}

// ManifestGets is the number of manifest GETs answered (not refused with
// 401 or 429) since the counters were reset.
func (r *Registry) ManifestGets() int64 { return r.manifestGets.Load() }

// BlobHeads is the number of blob HEADs answered (found or not).
func (r *Registry) BlobHeads() int64 { return r.blobHeads.Load() }

// ManifestHeads is the number of manifest HEADs answered.
func (r *Registry) ManifestHeads() int64 { return r.manifestHeads.Load() }

// TooManyRequests is the number of manifest GETs refused with 429.
func (r *Registry) TooManyRequests() int64 { return r.tooMany.Load() }

// ManifestGetsOf is the number of GETs answered of one manifest of repo,
// by the reference the client named (a tag, or a digest).
func (r *Registry) ManifestGetsOf(repo, ref string) int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.perManifest[manifestKey(repo, ref)]
}

func manifestKey(repo, ref string) string {
	if strings.Contains(ref, ":") {
		return repo + "@" + ref
	}
	return repo + ":" + ref
}

// SetRepoCredentials makes one repository private: every request for it
// (manifests, blobs, tags) needs these as basic auth, while the rest of the
// registry stays as it is (not combined with SetToken: in token mode the
// token alone decides). Empty user: public again.
func (r *Registry) SetRepoCredentials(repo, user, pass string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if user == "" {
		delete(r.repoCreds, repo)
		return
	}
	r.repoCreds[repo] = [2]string{user, pass}
}

func (r *Registry) repoCredsOK(req *http.Request) bool {
	m := repoPath.FindStringSubmatch(req.URL.Path)
	if m == nil {
		return true
	}
	r.mu.Lock()
	c, private := r.repoCreds[m[1]]
	r.mu.Unlock()
	if !private {
		return true
	}
	u, p, ok := req.BasicAuth()
	return ok && u == c[0] && p == c[1]
}

// takeManifestGet counts a manifest GET, or says it is over the limit and
// how long the client is to wait.
func (r *Registry) takeManifestGet(client, repo, ref string) (ok bool, limit, remaining int64, retry time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.limit > 0 && r.window >= r.limit {
		r.tooMany.Add(1)
		r.tooManyBy[client]++
		return false, r.limit, 0, r.retryAfter
	}
	r.window++
	r.manifestGets.Add(1)
	r.perManifest[manifestKey(repo, ref)]++
	r.getsByClient[client]++
	return true, r.limit, r.limit - r.window, 0
}

// SetOutage makes the registry unreachable: OutageRefuse closes its
// listener (a dial is refused) and listens again on the same address when
// the outage ends; OutageClose accepts connections and resets them at once;
// OutageHang accepts them and never answers. Connections open when an
// outage starts are cut, so a client's pooled connection does not outlive
// it. OutageNone: up again.
func (r *Registry) SetOutage(mode string) error {
	switch mode {
	case OutageNone, OutageRefuse, OutageClose, OutageHang:
	default:
		return fmt.Errorf("testregistry: outage %q: want refuse, close, hang or none", mode)
	}
	r.lnMu.Lock()
	defer r.lnMu.Unlock()
	if r.closed {
		return errors.New("testregistry: closed")
	}
	prev := r.Outage()
	r.outage.Store(&mode)
	if mode != OutageNone {
		for c := range r.conns {
			reset(c)
			r.cut.Add(1)
		}
	}
	if mode != OutageHang {
		for c := range r.held {
			reset(c)
		}
		r.held = map[net.Conn]struct{}{}
	}
	switch {
	case mode == OutageRefuse && r.outageLn != nil:
		r.outageLn.Close()
		r.outageLn = nil
	case mode != OutageRefuse && r.outageLn == nil:
		// The port was ours a moment ago; retry briefly should another
		// socket hold it still.
		var ln net.Listener
		var err error
		for deadline := time.Now().Add(5 * time.Second); ; {
			if ln, err = net.Listen("tcp", r.Host); err == nil || time.Now().After(deadline) {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		if err != nil {
			r.outage.Store(&prev)
			return fmt.Errorf("testregistry: listen again: %w", err)
		}
		r.ln = ln
		r.outageLn = &outageListener{Listener: ln, r: r}
		r.serve(r.outageLn)
	}
	return nil
}

// Outage is the current outage mode ("" when up).
func (r *Registry) Outage() string {
	if p := r.outage.Load(); p != nil {
		return *p
	}
	return OutageNone
}

// OutageCuts is the number of connections reset or cut by outages.
func (r *Registry) OutageCuts() int64 { return r.cut.Load() }

func (r *Registry) connState(c net.Conn, st http.ConnState) {
	r.lnMu.Lock()
	defer r.lnMu.Unlock()
	switch st {
	case http.StateNew:
		r.conns[c] = struct{}{}
	case http.StateClosed, http.StateHijacked:
		delete(r.conns, c)
	}
}

// reset closes c with an RST rather than a FIN.
func reset(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	c.Close()
}

// outageListener hands the server only connections made while there is no
// outage of the close or hang kind.
type outageListener struct {
	net.Listener
	r *Registry
}

func (l *outageListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		switch l.r.Outage() {
		case OutageClose:
			l.r.cut.Add(1)
			reset(c)
			continue
		case OutageHang:
			l.r.lnMu.Lock()
			if l.r.closed {
				c.Close()
			} else {
				l.r.held[c] = struct{}{}
			}
			l.r.lnMu.Unlock()
			continue
		}
		return c, nil
	}
}

// Stats is what the registry counted, and its knobs.
type Stats struct {
	BlobBytes       int64            `json:"blob_bytes"`
	BlobGets        int64            `json:"blob_gets"`
	ManifestGets    int64            `json:"manifest_gets"`
	ManifestHeads   int64            `json:"manifest_heads"`
	TooManyRequests int64            `json:"too_many_requests"`
	ManifestsByRef  map[string]int64 `json:"manifest_gets_by_ref"`
	// By the client's address, as Docker Hub meters anonymous pulls.
	ManifestGetsByClient map[string]int64 `json:"manifest_gets_by_client"`
	TooManyByClient      map[string]int64 `json:"too_many_requests_by_client"`
	OutageCuts           int64            `json:"outage_cuts"`
	Outage               string           `json:"outage"`
	Down                 bool             `json:"down"`
	Limit                int64            `json:"limit"`
	LimitUsed            int64            `json:"limit_used"`
}

// Stats returns the counters.
func (r *Registry) Stats() Stats {
	st := Stats{
		BlobBytes: r.BlobBytes(), BlobGets: r.BlobGets(),
		ManifestGets: r.ManifestGets(), ManifestHeads: r.ManifestHeads(), TooManyRequests: r.TooManyRequests(),
		OutageCuts: r.OutageCuts(), Outage: r.Outage(), Down: r.down.Load(),
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	st.ManifestsByRef = maps.Clone(r.perManifest)
	st.ManifestGetsByClient = maps.Clone(r.getsByClient)
	st.TooManyByClient = maps.Clone(r.tooManyBy)
	st.Limit, st.LimitUsed = r.limit, r.window
	return st
}

func (r *Registry) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if r.down.Load() {
			http.Error(w, "down for the test", http.StatusServiceUnavailable)
			return
		}
		path := req.URL.Path
		if tp := r.token.Load(); tp != nil && *tp != "" {
			token := *tp
			if path == "/token" {
				if !r.credsOK(req) {
					http.Error(w, `{"errors":[{"code":"UNAUTHORIZED","message":"credentials required"}]}`, http.StatusUnauthorized)
					return
				}
				w.Header().Set("Content-Type", "application/json")
				fmt.Fprintf(w, `{"token":%q}`, token)
				return
			}
			if req.Header.Get("Authorization") != "Bearer "+token && !strings.HasPrefix(path, "/_objects/") {
				w.Header().Set("WWW-Authenticate", fmt.Sprintf(`Bearer realm="%s/token",service="testregistry"`, r.URL))
				w.Header().Set("Content-Type", "application/json")
				w.WriteHeader(http.StatusUnauthorized)
				io.WriteString(w, `{"errors":[{"code":"UNAUTHORIZED","message":"token required"}]}`)
				return
			}
		} else if (!r.credsOK(req) || !r.repoCredsOK(req)) && !strings.HasPrefix(path, "/_objects/") {
			w.Header().Set("WWW-Authenticate", `Basic realm="testregistry"`)
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusUnauthorized)
			io.WriteString(w, `{"errors":[{"code":"UNAUTHORIZED","message":"credentials required"}]}`)
			return
		}
		if m := manifestPath.FindStringSubmatch(path); m != nil {
			switch req.Method {
			case http.MethodGet:
				client, _, err := net.SplitHostPort(req.RemoteAddr)
				if err != nil {
					client = req.RemoteAddr
				}
				ok, limit, remaining, retry := r.takeManifestGet(client, m[1], m[2])
				if limit > 0 {
					w.Header().Set("RateLimit-Limit", fmt.Sprintf("%d;w=21600", limit))
					w.Header().Set("RateLimit-Remaining", fmt.Sprintf("%d;w=21600", remaining))
				}
				if !ok {
					secs := max(int64((retry+time.Second-1)/time.Second), 1)
					w.Header().Set("Retry-After", strconv.FormatInt(secs, 10))
					w.Header().Set("Content-Type", "application/json")
					w.WriteHeader(http.StatusTooManyRequests)
					io.WriteString(w, TooManyRequestsBody)
					return
				}
			case http.MethodHead:
				r.manifestHeads.Add(1)
			}
		}
		if obj, ok := strings.CutPrefix(path, "/_objects/"); ok && req.Method == http.MethodGet {
			// The "object store": same bytes, reached through a signed URL.
			repo, dgst, _ := strings.Cut(obj, "@")
			if req.URL.Query().Get("sig") != "ok" {
				http.Error(w, "bad signature", http.StatusForbidden)
				return
			}
			req = req.Clone(req.Context())
			req.URL.Path = "/v2/" + repo + "/blobs/" + dgst
			path = req.URL.Path
		} else if m := blobPath.FindStringSubmatch(path); m != nil && req.Method == http.MethodGet && r.redirect.Load() {
			r.redirected.Add(1)
			http.Redirect(w, req, "/_objects/"+m[1]+"@"+m[2]+"?sig=ok", http.StatusTemporaryRedirect)
			return
		}
		m := blobPath.FindStringSubmatch(path)
		if m != nil && req.Method == http.MethodHead {
			r.blobHeads.Add(1)
		}
		if m == nil || req.Method != http.MethodGet {
			next.ServeHTTP(w, req)
			return
		}
		if r.ignoreRange.Load() {
			req.Header.Del("Range")
		} else if rg := req.Header.Get("Range"); strings.HasPrefix(rg, "bytes=") && strings.HasSuffix(rg, "-") {
			// containerd resumes a blob with an open-ended range
			// ("bytes=N-"), as registries serve it; go-containerregistry's
			// answers those 416: end it at the blob's last byte.
			if st, ok := r.blobs.(registry.BlobStatHandler); ok {
				if h, err := v1.NewHash(m[2]); err == nil {
					if size, err := st.Stat(req.Context(), m[1], h); err == nil && size > 0 {
						req = req.Clone(req.Context())
						req.Header.Set("Range", fmt.Sprintf("%s%d", rg, size-1))
					}
				}
			}
		}
		cw := &countingWriter{ResponseWriter: w, r: r, digest: m[2], corrupt: r.corrupt.Load()}
		if p := r.pace.Load(); p > 0 {
			cw.limiter = rate.NewLimiter(rate.Limit(p), 256<<10)
			cw.ctx = req.Context()
		}
		next.ServeHTTP(cw, req)
		if cw.status/100 == 2 {
			r.blobGets.Add(1)
		}
	})
}

type countingWriter struct {
	http.ResponseWriter
	r         *Registry
	digest    string
	status    int
	corrupt   bool
	corrupted bool
	limiter   *rate.Limiter
	ctx       context.Context
}

func (c *countingWriter) WriteHeader(code int) {
	c.status = code
	c.ResponseWriter.WriteHeader(code)
}

func (c *countingWriter) Write(b []byte) (int, error) {
	if c.status == 0 {
		c.status = http.StatusOK
	}
	if c.status/100 != 2 {
		return c.ResponseWriter.Write(b)
	}
	written := 0
	for len(b) > 0 {
		chunk := b
		if c.limiter != nil && len(chunk) > 64<<10 {
			chunk = chunk[:64<<10]
		}
		if c.limiter != nil {
			if err := c.limiter.WaitN(c.ctx, len(chunk)); err != nil {
				return written, err
			}
		}
		out := chunk
		if c.corrupt && !c.corrupted && len(chunk) > 0 {
			out = append([]byte(nil), chunk...)
			out[len(out)/2] ^= 0xff
			c.corrupted = true
		}
		n, err := c.ResponseWriter.Write(out)
		written += n
		c.r.blobBytes.Add(int64(n))
		c.r.lastWrite.Store(time.Now().UnixNano())
		c.r.mu.Lock()
		c.r.perBlob[c.digest] += int64(n)
		c.r.mu.Unlock()
		if err != nil {
			return written, err
		}
		b = b[len(chunk):]
	}
	return written, nil
}
