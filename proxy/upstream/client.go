// Package upstream is the client side of the OCI distribution API that the
// mirror uses to reach the real registries: pooled connections, timeouts,
// bounded retries with backoff, redirects to object storage reused for later
// pieces, and Range requests for pieces.
package upstream

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
	"github.com/registry-proxy/registry-proxy/internal/drain"
	"github.com/registry-proxy/registry-proxy/internal/ttlcache"
	"github.com/registry-proxy/registry-proxy/metrics"
)

var (
	// ErrUnknownRegistry means no upstream URL can be derived for a registry name.
	ErrUnknownRegistry = errors.New("upstream: unknown registry")
	// ErrUnavailable means the upstream could not be reached or kept failing.
	ErrUnavailable = errors.New("upstream: unavailable")
	// ErrBadResponse means the upstream answered something a registry must not.
	ErrBadResponse = errors.New("upstream: bad response")
	// ErrBadRepository means a repository name is not one the distribution
	// spec allows.
	ErrBadRepository = errors.New("upstream: invalid repository name")
	// ErrForbiddenAddress means a connection would reach a loopback,
	// link-local or private address that no configured upstream names.
	ErrForbiddenAddress = errors.New("upstream: address not allowed")
)

// ValidRepository reports whether name is a repository name by
// distribution/reference's grammar: the path of a name (no "..", no empty
// or upper-case components, at most 255 characters), checked as the path
// under a one-letter domain.
func ValidRepository(name string) bool {
	if name == "" || strings.HasPrefix(name, "/") {
		return false
	}
	_, err := reference.WithName("x/" + name)
	return err == nil
}

// StatusError is a non-success status from the upstream registry, kept whole
// enough to pass back to the client (401 with its challenge, 404, 429, ...).
type StatusError struct {
	Code   int
	Header http.Header
	Body   []byte // the start of the body, for an OCI error passed through
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("upstream: status %d %s", e.Code, http.StatusText(e.Code))
}

// Unreachable reports whether err means the registry could not answer: no
// connection, a reset, a timeout, a 5xx, or 429 (rate limited), as opposed to
// an answer about the content (401, 403, 404). What the cluster holds may
// stand in for the registry's answer then.
func Unreachable(err error) bool {
	var se *StatusError
	if errors.As(err, &se) {
		return se.Code >= 500 || se.Code == http.StatusTooManyRequests
	}
	return errors.Is(err, ErrUnavailable) || errors.Is(err, context.DeadlineExceeded)
}

// Throttled reports whether err is a 429, the registry's or one this node
// answered itself while honouring an earlier one's Retry-After.
func Throttled(err error) bool {
	var se *StatusError
	return errors.As(err, &se) && se.Code == http.StatusTooManyRequests
}

// Options configure a Client.
type Options struct {
	// Registries maps a registry name (as containerd sends it in ns=) to its
	// base URL. Names not listed map to https://NAME, where Allow lets them;
	// docker.io to Docker Hub.
	Registries map[string]string
	// Allow lists the registry names beyond Registries that may be fetched:
	// exact names, or "*.example.com" for every name under example.com.
	// Any other name is ErrUnknownRegistry, without a connection.
	Allow []string
	// DialContext dials upstream connections; a net.Dialer when nil.
	DialContext func(ctx context.Context, network, addr string) (net.Conn, error)
	// Transport replaces the whole transport (tests); DialContext is then unused.
	Transport http.RoundTripper
	// ResponseHeaderTimeout bounds the wait for a response's headers.
	ResponseHeaderTimeout time.Duration
	// Attempts is how many times a request is tried on 5xx, 429 or a
	// transport error.
	Attempts int
	// Backoff is the wait before the first retry; it doubles each time.
	Backoff time.Duration
	// RedirectTTL is how long a blob's redirect target is reused.
	RedirectTTL time.Duration
	// UserAgent is sent with every request.
	UserAgent string
	// MaxConnsPerHost bounds the connections to one upstream host; zero:
	// no bound.
	MaxConnsPerHost int
	Logger          *slog.Logger
	// Metrics counts requests by host and status; may be nil.
	Metrics *metrics.Metrics
}

// Client talks to upstream registries.
type Client struct {
	http       *http.Client
	registries map[string]*url.URL
	attempts   int
	backoff    time.Duration
	ua         string
	allow      []string
	redirects  *ttlcache.Cache[string, *url.URL]
	// throttle holds, per host, method and kind of request (manifests,
	// blobs), when a 429's Retry-After runs out: until then such requests
	// are answered 429 here, without asking (no retry storm). Shared by the
	// clients WithNodeCredentials makes.
	throttle *throttle
	log      *slog.Logger
	metrics  *metrics.Metrics
	// auth answers challenges with this node's own credentials; nil passes
	// the caller's Authorization through and a 401 back.
	auth *nodeAuth
}

// WithNodeCredentials returns a client for fetches on peers' behalf: it
// sends no caller's credentials but answers the registry's challenges itself,
// with creds (anonymously for a registry creds has nothing for). It shares
// c's connections.
func (c *Client) WithNodeCredentials(creds Credentials) *Client {
	cc := *c
	cc.auth = &nodeAuth{c: c, creds: creds, tokens: map[string]token{}, last: map[string]token{}}
	return &cc
}

// DockerHub is where docker.io is fetched from unless configured otherwise.
const DockerHub = "https://registry-1.docker.io"

// New returns a client.
func New(opts Options) (*Client, error) {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Attempts <= 0 {
		opts.Attempts = 3
	}
	if opts.Backoff <= 0 {
		opts.Backoff = 200 * time.Millisecond
	}
	if opts.RedirectTTL <= 0 {
		opts.RedirectTTL = time.Minute
	}
	if opts.ResponseHeaderTimeout <= 0 {
		opts.ResponseHeaderTimeout = 30 * time.Second
	}
	regs := map[string]*url.URL{}
	local := map[string]bool{} // host:port that configured URLs name
	for name, raw := range opts.Registries {
		u, err := ParseBaseURL(raw)
		if err != nil {
			return nil, fmt.Errorf("upstream %s: %w", name, err)
		}
		regs[name] = u
		local[hostPort(u)] = true
	}
	rt := opts.Transport
	if rt == nil {
		dial := opts.DialContext
		if dial == nil {
			dial = guardedDialer(local)
		}
		rt = &http.Transport{
			Proxy:       http.ProxyFromEnvironment,
			DialContext: dial,
			// HTTP/1.1: parallel pieces get connections of their own, as
			// object storage paces each connection.
			ForceAttemptHTTP2:     false,
			MaxIdleConns:          256,
			MaxIdleConnsPerHost:   64,
			MaxConnsPerHost:       opts.MaxConnsPerHost,
			IdleConnTimeout:       90 * time.Second,
			TLSHandshakeTimeout:   10 * time.Second,
			ResponseHeaderTimeout: opts.ResponseHeaderTimeout,
			ExpectContinueTimeout: time.Second,
			// Blobs are compressed already; asking for gzip would only make
			// the transport hide Content-Length and break ranges.
			DisableCompression: true,
		}
	}
	return &Client{
		http:       &http.Client{Transport: rt, CheckRedirect: checkRedirect},
		registries: regs,
		allow:      opts.Allow,
		attempts:   opts.Attempts,
		backoff:    opts.Backoff,
		ua:         opts.UserAgent,
		redirects:  ttlcache.New[string, *url.URL](4096, opts.RedirectTTL),
		throttle:   newThrottle(time.Now),
		log:        opts.Logger.With("component", "upstream"),
		metrics:    opts.Metrics,
	}, nil
}

// Close drops the idle connections to upstreams.
func (c *Client) Close() { c.http.CloseIdleConnections() }

// ParseBaseURL checks an upstream base URL: http or https, a host, no query.
func ParseBaseURL(raw string) (*url.URL, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("parse %q: %w", raw, err)
	}
	if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.RawQuery != "" {
		return nil, fmt.Errorf("%q: want http(s)://host[:port][/path]", raw)
	}
	u.Path = strings.TrimSuffix(u.Path, "/")
	return u, nil
}

// BaseURL returns the base URL for a registry name: the configured one, or
// https://NAME for a name the allowlist lets through.
func (c *Client) BaseURL(registry string) (*url.URL, error) {
	if u, ok := c.registries[registry]; ok {
		return u, nil
	}
	if !validHost(registry) || !allowed(c.allow, registry) {
		return nil, fmt.Errorf("%w: %q is neither configured nor allowed", ErrUnknownRegistry, registry)
	}
	if registry == "docker.io" || registry == "registry-1.docker.io" || registry == "index.docker.io" {
		return ParseBaseURL(DockerHub)
	}
	return ParseBaseURL("https://" + registry)
}

// CheckRepository says whether this client would fetch repo of registry.
func (c *Client) CheckRepository(registry, repo string) error {
	_, err := c.repoBase(registry, repo)
	return err
}

// repoBase is BaseURL for a valid repository name.
func (c *Client) repoBase(registry, repo string) (*url.URL, error) {
	u, err := c.BaseURL(registry)
	if err != nil {
		return nil, err
	}
	if !ValidRepository(repo) {
		return nil, fmt.Errorf("%w: %q", ErrBadRepository, repo)
	}
	return u, nil
}

// allowed matches a registry name against allowlist patterns.
func allowed(patterns []string, registry string) bool {
	host := registry
	if h, _, err := net.SplitHostPort(registry); err == nil {
		host = h
	}
	for _, p := range patterns {
		if p == registry || p == host {
			return true
		}
		if suffix, ok := strings.CutPrefix(p, "*."); ok && strings.HasSuffix(host, "."+suffix) {
			return true
		}
	}
	return false
}

// hostLabel is the metric label of a request to host: a configured
// registry's name, an allowed name or the pattern it matched ("*.gcr.io"),
// Docker Hub, or "other" (redirect targets, ports on allowed names): a
// bounded set whatever clients ask for.
func (c *Client) hostLabel(host string) string {
	for name, u := range c.registries {
		if u.Host == host {
			return name
		}
	}
	if host == "registry-1.docker.io" {
		return "docker.io"
	}
	for _, p := range c.allow {
		if p == host {
			return p
		}
		if suffix, ok := strings.CutPrefix(p, "*."); ok && strings.HasSuffix(host, "."+suffix) && !strings.Contains(host, ":") {
			return p
		}
	}
	return "other"
}

// hostPort is u's host with its port made explicit.
func hostPort(u *url.URL) string {
	port := u.Port()
	if port == "" {
		port = "443"
		if u.Scheme == "http" {
			port = "80"
		}
	}
	return net.JoinHostPort(u.Hostname(), port)
}

// guardedDialer dials upstreams, refusing loopback, link-local, private and
// other special addresses unless a configured upstream URL names exactly
// this host and port. It checks the address actually dialled, after name
// resolution, so names that resolve to such addresses, and redirects to
// them, are caught as well.
func guardedDialer(local map[string]bool) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		d := &net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}
		if !local[addr] {
			d.Control = func(_, address string, _ syscall.RawConn) error {
				host, _, err := net.SplitHostPort(address)
				if err != nil {
					return err
				}
				ip, err := netip.ParseAddr(host)
				if err != nil {
					return fmt.Errorf("%w: %s", ErrForbiddenAddress, address)
				}
				if special(ip.Unmap()) {
					return fmt.Errorf("%w: %s resolves to %s, which no configured upstream names", ErrForbiddenAddress, addr, ip)
				}
				return nil
			}
		}
		return d.DialContext(ctx, network, addr)
	}
}

// specialPrefixes are the special ranges netip has no predicate for.
var specialPrefixes = [...]netip.Prefix{
	netip.MustParsePrefix("100.64.0.0/10"), // CGNAT
	netip.MustParsePrefix("198.18.0.0/15"), // benchmarking
	netip.MustParsePrefix("0.0.0.0/8"),
	netip.MustParsePrefix("240.0.0.0/4"),
}

// special is an address a mirror must not be made to reach by a name or a
// redirect: loopback, link-local (cloud metadata), private, CGNAT,
// unspecified, multicast, and the benchmarking range.
func special(ip netip.Addr) bool {
	if ip.IsLoopback() || ip.IsLinkLocalUnicast() || ip.IsLinkLocalMulticast() || ip.IsPrivate() ||
		ip.IsUnspecified() || ip.IsMulticast() || ip.IsInterfaceLocalMulticast() {
		return true
	}
	for _, p := range specialPrefixes {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

// checkRedirect follows at most 10 redirects and never from https to http.
func checkRedirect(req *http.Request, via []*http.Request) error {
	if len(via) >= 10 {
		return fmt.Errorf("%w: more than 10 redirects", ErrBadResponse)
	}
	if prev := via[len(via)-1]; prev.URL.Scheme == "https" && req.URL.Scheme != "https" {
		return fmt.Errorf("%w: redirect from https to %s refused", ErrBadResponse, req.URL.Scheme)
	}
	return nil
}

// validHost accepts host or host:port as containerd sends it in ns=.
func validHost(s string) bool {
	if s == "" || len(s) > 253 || strings.ContainsAny(s, "/?#@ \\") {
		return false
	}
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		host, port = s, ""
	}
	if port != "" {
		if n, err := strconv.Atoi(port); err != nil || n <= 0 || n > 65535 {
			return false
		}
	}
	u, err := url.Parse("https://" + s)
	return err == nil && u.Hostname() == strings.Trim(host, "[]")
}

// Ping sends GET /v2/ to the registry; its 401 challenge is what dockerd
// authenticates against.
func (c *Client) Ping(ctx context.Context, registry string, hdr http.Header) (*http.Response, error) {
	u, err := c.BaseURL(registry)
	if err != nil {
		return nil, err
	}
	return c.do(ctx, http.MethodGet, u.JoinPath("/v2/").String(), hdr, true)
}

// Manifest fetches (GET) or checks (HEAD) a manifest by tag or digest. A
// non-2xx status comes back as *StatusError.
func (c *Client) Manifest(ctx context.Context, method, registry, repo, ref string, hdr http.Header) (*http.Response, error) {
	u, err := c.repoBase(registry, repo)
	if err != nil {
		return nil, err
	}
	resp, err := c.doRegistry(ctx, method, registry, repo, u.JoinPath("/v2/", repo, "manifests", ref).String(), hdr)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, statusError(resp)
	}
	return resp, nil
}

// BlobSize asks the upstream for a blob's size with HEAD.
func (c *Client) BlobSize(ctx context.Context, registry, repo string, d digest.Digest, hdr http.Header) (int64, error) {
	u, err := c.repoBase(registry, repo)
	if err != nil {
		return 0, err
	}
	resp, err := c.doRegistry(ctx, http.MethodHead, registry, repo, u.JoinPath("/v2/", repo, "blobs", d.String()).String(), hdr)
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, statusError(resp)
	}
	if resp.ContentLength < 0 {
		return 0, fmt.Errorf("%w: HEAD %s: no Content-Length", ErrBadResponse, d)
	}
	if got := resp.Header.Get("Docker-Content-Digest"); got != "" && got != d.String() {
		return 0, fmt.Errorf("%w: HEAD %s: Docker-Content-Digest %s", ErrBadResponse, d, got)
	}
	return resp.ContentLength, nil
}

// Blob opens bytes [off, off+n) of a blob with a Range request. If the
// upstream ignores Range and sends the whole blob, whole is true and the body
// starts at offset 0. A redirect target (object storage) is reused for later
// ranges of the same blob until it fails or expires.
func (c *Client) Blob(ctx context.Context, registry, repo string, d digest.Digest, off, n int64, hdr http.Header) (body io.ReadCloser, whole bool, err error) {
	if n == 0 {
		return io.NopCloser(strings.NewReader("")), false, nil
	}
	h := hdr.Clone()
	if h == nil {
		h = http.Header{}
	}
	h.Set("Range", fmt.Sprintf("bytes=%d-%d", off, off+n-1))
	key := registry + "/" + repo + "@" + d.String()

	if target, ok := c.redirects.Get(key); ok {
		// Object storage URLs carry their own signature; send no credentials.
		rh := h.Clone()
		rh.Del("Authorization")
		resp, err := c.do(ctx, http.MethodGet, target.String(), rh, false)
		if err == nil {
			var body io.ReadCloser
			var whole bool
			if body, whole, err = rangeBody(resp, off, n); err == nil {
				return body, whole, nil
			}
		}
		c.log.Debug("cached redirect failed, asking the registry again", "digest", d, "err", err)
		c.redirects.Remove(key)
	}

	u, err := c.repoBase(registry, repo)
	if err != nil {
		return nil, false, err
	}
	reqURL := u.JoinPath("/v2/", repo, "blobs", d.String()).String()
	resp, err := c.doRegistry(ctx, http.MethodGet, registry, repo, reqURL, h)
	if err != nil {
		return nil, false, err
	}
	if final := resp.Request.URL; final.String() != reqURL && resp.StatusCode/100 == 2 {
		c.redirects.Add(key, final)
	}
	return rangeBody(resp, off, n)
}

func rangeBody(resp *http.Response, off, n int64) (io.ReadCloser, bool, error) {
	switch resp.StatusCode {
	case http.StatusPartialContent:
		start, end, _, err := ParseContentRange(resp.Header.Get("Content-Range"))
		if err != nil || start != off || end != off+n-1 {
			resp.Body.Close()
			return nil, false, fmt.Errorf("%w: asked bytes %d-%d, got Content-Range %q", ErrBadResponse, off, off+n-1, resp.Header.Get("Content-Range"))
		}
		return resp.Body, false, nil
	case http.StatusOK:
		return resp.Body, true, nil
	default:
		return nil, false, statusError(resp)
	}
}

// ParseContentRange parses "bytes start-end/size"; size is -1 for "*".
func ParseContentRange(s string) (start, end, size int64, err error) {
	rest, ok := strings.CutPrefix(s, "bytes ")
	if !ok {
		return 0, 0, 0, fmt.Errorf("content-range %q: no bytes unit", s)
	}
	rng, total, ok := strings.Cut(rest, "/")
	if !ok {
		return 0, 0, 0, fmt.Errorf("content-range %q: no size", s)
	}
	a, b, ok := strings.Cut(rng, "-")
	if !ok {
		return 0, 0, 0, fmt.Errorf("content-range %q: no range", s)
	}
	if start, err = strconv.ParseInt(a, 10, 64); err != nil || start < 0 {
		return 0, 0, 0, fmt.Errorf("content-range %q: bad start", s)
	}
	if end, err = strconv.ParseInt(b, 10, 64); err != nil || end < start {
		return 0, 0, 0, fmt.Errorf("content-range %q: bad end", s)
	}
	size = -1
	if total != "*" {
		if size, err = strconv.ParseInt(total, 10, 64); err != nil || size <= end {
			return 0, 0, 0, fmt.Errorf("content-range %q: bad size", s)
		}
	}
	return start, end, size, nil
}

// doRegistry sends a request to a registry. A client with node credentials
// answers a 401 challenge itself and tries once more; any other passes the
// caller's headers through.
func (c *Client) doRegistry(ctx context.Context, method, registry, repo, rawURL string, hdr http.Header) (*http.Response, error) {
	if c.auth == nil {
		return c.do(ctx, method, rawURL, hdr, true)
	}
	h := hdr.Clone()
	if h == nil {
		h = http.Header{}
	}
	h.Del("Authorization") // never a client's, on a node's own fetch
	if v := c.auth.cached(registry, repo); v != "" {
		h.Set("Authorization", v)
	}
	resp, err := c.do(ctx, method, rawURL, h, true)
	if err != nil || resp.StatusCode != http.StatusUnauthorized {
		return resp, err
	}
	challenge := resp.Header.Get("WWW-Authenticate")
	first := statusError(resp)
	v, err := c.auth.authorize(ctx, registry, repo, challenge)
	if errors.Is(err, ErrNoCredentials) {
		return nil, first
	}
	if err != nil {
		return nil, err
	}
	h.Set("Authorization", v)
	resp, err = c.do(ctx, method, rawURL, h, true)
	if err != nil || resp.StatusCode != http.StatusUnauthorized || !c.auth.forget(registry, repo) {
		return resp, err
	}
	// The registry refused what this node had cached (a plugin's
	// credential, a token) while it still seemed valid: it expired or was
	// revoked early. Ask the source once more.
	c.log.Info("registry refused this node's cached credentials; refreshing them", "registry", registry, "repo", repo)
	drain.Close(resp.Body)
	if v, err = c.auth.authorize(ctx, registry, repo, challenge); err != nil {
		if errors.Is(err, ErrNoCredentials) {
			return nil, first
		}
		return nil, err
	}
	h.Set("Authorization", v)
	return c.do(ctx, method, rawURL, h, true)
}

// do sends a request, retrying 5xx, 429 and transport errors with backoff.
// With retry false it tries once.
func (c *Client) do(ctx context.Context, method, rawURL string, hdr http.Header, retry bool) (*http.Response, error) {
	attempts := 1
	if retry {
		attempts = c.attempts
	}
	var lastErr error
	for i := 0; i < attempts; i++ {
		if i > 0 {
			wait := c.backoff << (i - 1)
			wait += rand.N(wait/2 + 1)
			select {
			case <-ctx.Done():
				return nil, errors.Join(ctx.Err(), lastErr)
			case <-time.After(wait):
			}
		}
		req, err := http.NewRequestWithContext(ctx, method, rawURL, nil)
		if err != nil {
			return nil, fmt.Errorf("upstream: %w", err)
		}
		tkey := throttleKey(req)
		if left, ok := c.throttle.until(tkey); ok {
			// The registry said 429 and when to come back: not before.
			return nil, &StatusError{Code: http.StatusTooManyRequests, Header: http.Header{"Retry-After": []string{strconv.Itoa(int(left.Seconds()) + 1)}},
				Body: []byte(`{"errors":[{"code":"TOOMANYREQUESTS","message":"the registry is rate limiting this node (Retry-After honoured)"}]}`)}
		}
		for k, v := range hdr {
			req.Header[k] = v
		}
		if c.ua != "" {
			req.Header.Set("User-Agent", c.ua)
		}
		resp, err := c.http.Do(req)
		if resp != nil {
			c.metrics.Upstream(c.hostLabel(req.URL.Host), method, resp.StatusCode)
		} else if ctx.Err() == nil {
			c.metrics.Upstream(c.hostLabel(req.URL.Host), method, 0)
		}
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			if errors.Is(err, ErrForbiddenAddress) {
				// A refusal of this node's own, the same on every try: not
				// retried, and no outage of the registry's.
				return nil, fmt.Errorf("upstream: %s %s: %w", method, redact(rawURL), err)
			}
			lastErr = fmt.Errorf("%w: %s %s: %w", ErrUnavailable, method, redact(rawURL), err)
			continue
		}
		if resp.StatusCode == http.StatusTooManyRequests {
			// Retrying a 429 spends what the registry just refused; its
			// Retry-After says when to ask again.
			wait := c.throttle.set(tkey, resp.Header.Get("Retry-After"))
			c.log.Warn("registry is rate limiting; honouring Retry-After", "host", req.URL.Host, "method", method, "kind", tkey.kind, "retry_after", wait)
			return resp, nil
		}
		if retry && retryable(resp.StatusCode) && i+1 < attempts {
			drain.Close(resp.Body)
			lastErr = fmt.Errorf("%w: %s %s: status %d", ErrUnavailable, method, redact(rawURL), resp.StatusCode)
			c.log.Debug("retrying upstream request", "method", method, "url", redact(rawURL), "status", resp.StatusCode)
			continue
		}
		return resp, nil
	}
	return nil, lastErr
}

func retryable(code int) bool {
	return code >= 500 && code != http.StatusNotImplemented
}

// redact drops the query, where object storage keeps its signatures.
func redact(raw string) string {
	if i := strings.IndexByte(raw, '?'); i >= 0 {
		return raw[:i] + "?..."
	}
	return raw
}

func statusError(resp *http.Response) error {
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 16<<10))
	return &StatusError{Code: resp.StatusCode, Header: resp.Header.Clone(), Body: body}
}
