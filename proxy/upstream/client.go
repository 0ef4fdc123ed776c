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
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/golang-lru/v2/expirable"
	"github.com/opencontainers/go-digest"
)

var (
	// ErrUnknownRegistry means no upstream URL can be derived for a registry name.
	ErrUnknownRegistry = errors.New("upstream: unknown registry")
	// ErrUnavailable means the upstream could not be reached or kept failing.
	ErrUnavailable = errors.New("upstream: unavailable")
	// ErrBadResponse means the upstream answered something a registry must not.
	ErrBadResponse = errors.New("upstream: bad response")
)

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

// Options configure a Client.
type Options struct {
	// Registries maps a registry name (as containerd sends it in ns=) to its
	// base URL. Names not listed map to https://NAME; docker.io to Docker Hub.
	Registries map[string]string
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
	Logger    *slog.Logger
}

// Client talks to upstream registries.
type Client struct {
	http       *http.Client
	registries map[string]*url.URL
	attempts   int
	backoff    time.Duration
	ua         string
	redirects  *expirable.LRU[string, *url.URL]
	log        *slog.Logger
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
	for name, raw := range opts.Registries {
		u, err := ParseBaseURL(raw)
		if err != nil {
			return nil, fmt.Errorf("upstream %s: %w", name, err)
		}
		regs[name] = u
	}
	rt := opts.Transport
	if rt == nil {
		dial := opts.DialContext
		if dial == nil {
			dial = (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext
		}
		rt = &http.Transport{
			Proxy:       http.ProxyFromEnvironment,
			DialContext: dial,
			// HTTP/1.1: parallel pieces get connections of their own, as
			// object storage paces each connection.
			ForceAttemptHTTP2:     false,
			MaxIdleConns:          256,
			MaxIdleConnsPerHost:   64,
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
		http:       &http.Client{Transport: rt},
		registries: regs,
		attempts:   opts.Attempts,
		backoff:    opts.Backoff,
		ua:         opts.UserAgent,
		redirects:  expirable.NewLRU[string, *url.URL](4096, nil, opts.RedirectTTL),
		log:        opts.Logger.With("component", "upstream"),
	}, nil
}

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

// BaseURL returns the base URL for a registry name.
func (c *Client) BaseURL(registry string) (*url.URL, error) {
	if u, ok := c.registries[registry]; ok {
		return u, nil
	}
	switch {
	case registry == "docker.io" || registry == "registry-1.docker.io" || registry == "index.docker.io":
		return ParseBaseURL(DockerHub)
	case validHost(registry):
		return ParseBaseURL("https://" + registry)
	}
	return nil, fmt.Errorf("%w: %q", ErrUnknownRegistry, registry)
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
	u, err := c.BaseURL(registry)
	if err != nil {
		return nil, err
	}
	resp, err := c.do(ctx, method, u.JoinPath("/v2/", repo, "manifests", ref).String(), hdr, true)
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
	u, err := c.BaseURL(registry)
	if err != nil {
		return 0, err
	}
	resp, err := c.do(ctx, http.MethodHead, u.JoinPath("/v2/", repo, "blobs", d.String()).String(), hdr, true)
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

	u, err := c.BaseURL(registry)
	if err != nil {
		return nil, false, err
	}
	reqURL := u.JoinPath("/v2/", repo, "blobs", d.String()).String()
	resp, err := c.do(ctx, http.MethodGet, reqURL, h, true)
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
		for k, v := range hdr {
			req.Header[k] = v
		}
		if c.ua != "" {
			req.Header.Set("User-Agent", c.ua)
		}
		resp, err := c.http.Do(req)
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			lastErr = fmt.Errorf("%w: %s %s: %w", ErrUnavailable, method, redact(rawURL), err)
			continue
		}
		if retry && retryable(resp.StatusCode) && i+1 < attempts {
			io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
			resp.Body.Close()
			lastErr = fmt.Errorf("%w: %s %s: status %d", ErrUnavailable, method, redact(rawURL), resp.StatusCode)
			c.log.Debug("retrying upstream request", "method", method, "url", redact(rawURL), "status", resp.StatusCode)
			continue
		}
		return resp, nil
	}
	return nil, lastErr
}

func retryable(code int) bool {
	return code == http.StatusTooManyRequests || (code >= 500 && code != http.StatusNotImplemented)
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
