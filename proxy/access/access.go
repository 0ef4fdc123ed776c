// Package access decides whether a client may read content this node holds
// (in its cache, or from peers) that the client did not fetch from the
// upstream itself: private content goes only to clients the upstream lets
// read it. The upstream is asked with a HEAD for that repository and digest,
// with the client's own credentials (anonymously for an anonymous client),
// and its answer is remembered briefly per credential, registry, repository
// and digest. Per registry, an access mode (Policy) may let a client without
// credentials be judged by this node's own instead.
package access

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/registry-proxy/registry-proxy/internal/ttlcache"

	"github.com/registry-proxy/registry-proxy/metrics"
	"github.com/registry-proxy/registry-proxy/proxy/upstream"
)

// Kind is what is read: a blob or a manifest.
type Kind int

const (
	Blob Kind = iota
	Manifest
)

// Upstream asks the registry; *upstream.Client is one.
type Upstream interface {
	BlobSize(ctx context.Context, registry, repo string, d digest.Digest, hdr http.Header) (int64, error)
	Manifest(ctx context.Context, method, registry, repo, ref string, hdr http.Header) (*http.Response, error)
}

// Options configure a Checker.
type Options struct {
	Upstream Upstream
	// NodeUpstream asks with this node's own credentials, for clients
	// without credentials of repositories Policy puts in NodeMode.
	NodeUpstream Upstream
	// Policy says whose credentials decide; nil: every client's own.
	Policy *Policy
	// TTL is how long an answer is remembered.
	TTL time.Duration
	// Size bounds the remembered answers.
	Size int
	// Timeout bounds one question to the upstream.
	Timeout time.Duration
	// StaleTTL is how long an allowed answer still counts while the
	// upstream cannot be reached (no answer, as opposed to a refusal), so
	// a registry outage does not stop a node serving its cache to the
	// clients it served before.
	StaleTTL time.Duration
	// Metrics counts checks by result; may be nil.
	Metrics *metrics.Metrics
	// PublicTTL is how long a repository the registry served to no
	// credentials at all counts as public while the registry cannot be
	// asked: every client may then read what the node holds of it. Zero:
	// never.
	PublicTTL time.Duration
	// Anonymous asks the registry with no credentials (anonymous tokens
	// only), to learn whether a repository is public; nil: never asked.
	Anonymous Upstream
	// Now is the clock; time.Now when nil.
	Now func() time.Time
}

// Checker answers and remembers access questions.
type Checker struct {
	opts  Options
	cache *ttlcache.Cache[key, error]
	stale *ttlcache.Cache[key, struct{}]
	// public holds when each repository was last known public; probed
	// whether an anonymous probe found it public, so it is asked rarely.
	public *ttlcache.Cache[repoKey, time.Time]
	probed *ttlcache.Cache[repoKey, bool]
	// down remembers registries that just could not be asked, so that
	// during an outage every read is not held up by retries first.
	down *ttlcache.Cache[string, error]
}

// downFor is how long a registry that could not be asked is not asked
// again by the access check, unless it answers something else first
// (Reachable).
const downFor = 10 * time.Second

// ErrUnanswered means the registry could not be asked whether a client may
// read something, and nothing this node knows allows it: not allowed in the
// last day, not public lately.
var ErrUnanswered = errors.New("access: the registry cannot be asked, and this client was not allowed before")

type repoKey struct{ registry, repo string }

type key struct {
	cred           [sha256.Size]byte
	registry, repo string
	digest         digest.Digest
	kind           Kind
}

// New returns a checker.
func New(opts Options) *Checker {
	if opts.TTL <= 0 {
		opts.TTL = time.Minute
	}
	if opts.Size <= 0 {
		opts.Size = 65536
	}
	if opts.Timeout <= 0 {
		opts.Timeout = 30 * time.Second
	}
	if opts.StaleTTL <= 0 {
		opts.StaleTTL = 24 * time.Hour
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	c := &Checker{
		opts:  opts,
		cache: ttlcache.New[key, error](opts.Size, opts.TTL),
		stale: ttlcache.New[key, struct{}](opts.Size, opts.StaleTTL),
		down:  ttlcache.New[string, error](1024, downFor),
	}
	c.probed = ttlcache.New[repoKey, bool](opts.Size, 6*time.Hour)
	if opts.PublicTTL > 0 {
		c.public = ttlcache.New[repoKey, time.Time](opts.Size, opts.PublicTTL)
		c.probed = ttlcache.New[repoKey, bool](opts.Size, min(max(opts.PublicTTL/4, time.Minute), 6*time.Hour))
	}
	return c
}

// nodeCred stands for this node's credentials in a key: no Authorization
// header hashes to it (a header value holds no NUL).
var nodeCred = sha256.Sum256([]byte("\x00node"))

// asNode reports whether clients of repo are judged by this node's
// credentials.
func (c *Checker) asNode(registry, repo string) bool {
	return c.opts.NodeUpstream != nil && c.opts.Policy.Node(registry, repo)
}

func (c *Checker) keyOf(hdr http.Header, registry, repo string, d digest.Digest, kind Kind) key {
	k := key{cred: sha256.Sum256([]byte(hdr.Get("Authorization"))), registry: registry, repo: repo, digest: d, kind: kind}
	if c.asNode(registry, repo) {
		k.cred = nodeCred
	}
	return k
}

// Check returns nil when the client whose request headers are hdr may read
// d in repo of registry; else the upstream's refusal (an
// *upstream.StatusError, 401 with its challenge included) or why it could
// not be asked. Only the upstream's own answers are remembered. For a
// repository in NodeMode the upstream is asked with this node's
// credentials, whatever the client sent.
func (c *Checker) Check(ctx context.Context, registry, repo string, d digest.Digest, kind Kind, hdr http.Header) error {
	k := c.keyOf(hdr, registry, repo, d, kind)
	if err, ok := c.cache.Get(k); ok {
		if err == nil {
			c.opts.Metrics.AccessCheck("cached_allowed")
		} else {
			c.opts.Metrics.AccessCheck("cached_refused")
		}
		return err
	}
	if err, ok := c.down.Get(registry); ok {
		return c.unanswered(k, registry, repo, err)
	}
	ctx, cancel := context.WithTimeout(ctx, c.opts.Timeout)
	defer cancel()
	auth := http.Header{}
	up := c.opts.Upstream
	if k.cred == nodeCred {
		up = c.opts.NodeUpstream
	} else if v := hdr.Get("Authorization"); v != "" {
		auth.Set("Authorization", v)
	}
	var err error
	switch kind {
	case Blob:
		_, err = up.BlobSize(ctx, registry, repo, d, auth)
	case Manifest:
		auth.Set("Accept", "*/*")
		var resp *http.Response
		if resp, err = up.Manifest(ctx, http.MethodHead, registry, repo, d.String(), auth); err == nil {
			resp.Body.Close()
		}
	}
	var se *upstream.StatusError
	switch {
	case err == nil:
		c.remember(k)
		if k.cred == anonymous {
			c.MarkPublic(registry, repo, c.opts.Now())
		}
		c.opts.Metrics.AccessCheck("allowed")
		return nil
	case errors.As(err, &se) && se.Code >= 400 && se.Code < 500 && se.Code != http.StatusTooManyRequests:
		c.cache.Add(k, err)
		c.stale.Remove(k)
		c.opts.Metrics.AccessCheck("refused")
		return err
	case upstream.Unreachable(err):
		c.down.Add(registry, err)
	}
	return c.unanswered(k, registry, repo, err)
}

// unanswered decides when the registry could not answer (err): a
// credential allowed this content before still is, and anyone may read a
// repository that was public lately.
func (c *Checker) unanswered(k key, registry, repo string, err error) error {
	switch {
	case c.stale.Contains(k):
		c.opts.Metrics.AccessCheck("stale_allowed")
		return nil
	case c.isPublic(registry, repo):
		c.opts.Metrics.AccessCheck("public_allowed")
		return nil
	}
	c.opts.Metrics.AccessCheck("error")
	return fmt.Errorf("%w: %w", ErrUnanswered, err)
}

// Reachable records that registry just answered a request: the access
// check asks it again at once.
func (c *Checker) Reachable(registry string) {
	c.down.Remove(registry)
}

func (c *Checker) remember(k key) {
	c.cache.Add(k, nil)
	c.stale.Add(k, struct{}{})
}

// anonymous is the key of a client without credentials.
var anonymous = sha256.Sum256(nil)

// MarkPublic records that the registry served repo to no credentials at
// time at (here, or on the member that says so).
func (c *Checker) MarkPublic(registry, repo string, at time.Time) {
	if c.public == nil || c.opts.Now().Sub(at) > c.opts.PublicTTL {
		return
	}
	k := repoKey{registry, repo}
	if held, ok := c.public.Get(k); ok && held.After(at) {
		return
	}
	c.public.Add(k, at)
}

// isPublic reports whether repo was public within PublicTTL.
func (c *Checker) isPublic(registry, repo string) bool {
	if c.public == nil {
		return false
	}
	at, ok := c.public.Get(repoKey{registry, repo})
	return ok && c.opts.Now().Sub(at) <= c.opts.PublicTTL
}

// Public reports whether the registry serves repo to no credentials at
// all: remembered, else asked once in a while with an anonymous HEAD of ref
// (free where manifest GETs are metered). A public repository's content
// may go to every client while the registry cannot be asked.
func (c *Checker) Public(ctx context.Context, registry, repo, ref string) bool {
	return c.probe(ctx, registry, repo, func(ctx context.Context) error {
		resp, err := c.opts.Anonymous.Manifest(ctx, http.MethodHead, registry, repo, ref, http.Header{"Accept": []string{"*/*"}})
		if err == nil {
			resp.Body.Close()
		}
		return err
	})
}

// PublicBlob is Public, asked with an anonymous HEAD of blob d.
func (c *Checker) PublicBlob(ctx context.Context, registry, repo string, d digest.Digest) bool {
	return c.probe(ctx, registry, repo, func(ctx context.Context) error {
		_, err := c.opts.Anonymous.BlobSize(ctx, registry, repo, d, nil)
		return err
	})
}

// probe answers whether repo is public: remembered, else by ask.
func (c *Checker) probe(ctx context.Context, registry, repo string, ask func(context.Context) error) bool {
	if c.opts.Anonymous == nil {
		return false
	}
	k := repoKey{registry, repo}
	if public, ok := c.probed.Get(k); ok {
		return public
	}
	ctx, cancel := context.WithTimeout(ctx, c.opts.Timeout)
	defer cancel()
	err := ask(ctx)
	var se *upstream.StatusError
	switch {
	case err == nil:
		c.probed.Add(k, true)
		c.MarkPublic(registry, repo, c.opts.Now())
		return true
	case errors.As(err, &se) && se.Code >= 400 && se.Code < 500 && se.Code != http.StatusTooManyRequests:
		c.probed.Add(k, false)
	}
	return false
}

// Allow records that the client of hdr read d from the upstream itself just
// now, so it need not be asked again.
func (c *Checker) Allow(registry, repo string, d digest.Digest, kind Kind, hdr http.Header) {
	c.remember(c.keyOf(hdr, registry, repo, d, kind))
}
