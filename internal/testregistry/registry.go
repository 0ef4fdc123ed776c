// Package testregistry runs a real OCI registry (go-containerregistry's
// pkg/registry) on loopback for tests, benchmarks and the demo, with knobs
// for the upstream behaviours a mirror must survive: pacing per connection,
// ignoring Range, corrupting blob bytes, redirecting blobs to an "object
// store" path, and being down. It counts the blob bytes it sends.
package testregistry

import (
	"context"

	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
	"golang.org/x/time/rate"
)

// Options configure a Registry.
type Options struct {
	// Addr to listen on; 127.0.0.1:0 when empty.
	Addr string
	// Listener, when set, is used instead of Addr.
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
	wg    sync.WaitGroup

	blobBytes   atomic.Int64
	blobGets    atomic.Int64
	lastWrite   atomic.Int64 // unix ns of the last blob bytes written
	redirected  atomic.Int64
	pace        atomic.Int64 // bytes/s per blob response, 0 = unpaced
	down        atomic.Bool
	ignoreRange atomic.Bool
	corrupt     atomic.Bool
	redirect    atomic.Bool

	mu      sync.Mutex
	perBlob map[string]int64
}

var blobPath = regexp.MustCompile(`^/v2/(.+)/blobs/(sha256:[a-f0-9]{64})$`)

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
		URL:     "http://" + ln.Addr().String(),
		Host:    ln.Addr().String(),
		ln:      ln,
		blobs:   registry.NewInMemoryBlobHandler(),
		perBlob: map[string]int64{},
	}
	inner := registry.New(registry.WithBlobHandler(r.blobs), registry.Logger(log.New(io.Discard, "", 0)))
	r.srv = &http.Server{Handler: r.wrap(inner), ReadHeaderTimeout: 10 * time.Second}
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		r.srv.Serve(ln)
	}()
	return r, nil
}

// Close stops the registry.
func (r *Registry) Close() error {
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

// ResetCounters zeroes the byte and request counters.
func (r *Registry) ResetCounters() {
	r.blobBytes.Store(0)
	r.blobGets.Store(0)
	r.lastWrite.Store(0)
	r.redirected.Store(0)
	r.mu.Lock()
	r.perBlob = map[string]int64{}
	r.mu.Unlock()
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
		} else if !r.credsOK(req) && !strings.HasPrefix(path, "/_objects/") {
			w.Header().Set("WWW-Authenticate", `Basic realm="testregistry"`)
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusUnauthorized)
			io.WriteString(w, `{"errors":[{"code":"UNAUTHORIZED","message":"credentials required"}]}`)
			return
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
		if m == nil || req.Method != http.MethodGet {
			next.ServeHTTP(w, req)
			return
		}
		if r.ignoreRange.Load() {
			req.Header.Del("Range")
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
