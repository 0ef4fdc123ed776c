// Package credprovider gives this node the registry credentials kubelet's
// image credential provider plugins give kubelet (ECR, GCR/Artifact
// Registry, ACR, ... helpers): it reads kubelet's CredentialProviderConfig,
// runs the same plugin binaries with the same exec protocol, and caches
// their answers as kubelet does, so a node configured for kubelet pulls
// private images through the mirror with no second set of credentials.
//
// A plugin that fails never fails a pull: Lookup then reports
// upstream.ErrNoCredentials (wrapped, with the reason) and the caller goes
// on anonymously, so public content keeps working.
package credprovider

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/golang-lru/v2/simplelru"
	"golang.org/x/sync/singleflight"

	"github.com/registry-proxy/registry-proxy/metrics"
	"github.com/registry-proxy/registry-proxy/proxy/upstream"
)

// Defaults of Options.
const (
	DefaultTimeout        = 10 * time.Second
	DefaultFailureBackoff = 30 * time.Second
)

// Cache bounds: entries are per image at most, and a node pulls from a
// bounded set of repositories; beyond that the least recently used go.
const (
	maxCacheEntries   = 4096
	maxFailureEntries = 1024
)

// Options configure New.
type Options struct {
	// ConfigFile is kubelet's --image-credential-provider-config file.
	ConfigFile string
	// BinDir is kubelet's --image-credential-provider-bin-dir.
	BinDir string
	// Timeout bounds one plugin run; 0 means DefaultTimeout.
	Timeout time.Duration
	// FailureBackoff is how long a failed run is remembered: within it the
	// plugin is not run again for the same registry. 0 means
	// DefaultFailureBackoff, negative means none.
	FailureBackoff time.Duration
	// Now is the clock of the cache; nil means time.Now.
	Now func() time.Time
	// Runner runs plugins; nil means ExecRunner.
	Runner Runner
	// Logger gets failures of plugins (never their stdout or credentials);
	// nil discards.
	Logger *slog.Logger
	// Metrics counts plugin runs by provider and result; nil counts nothing.
	Metrics *metrics.Metrics
}

// Providers is this node's credentials from kubelet credential provider
// plugins. It is safe for concurrent use.
type Providers struct {
	providers []*provider
	timeout   time.Duration
	backoff   time.Duration
	now       func() time.Time
	runner    Runner
	log       *slog.Logger
	metrics   *metrics.Metrics

	// flights makes concurrent Lookups of one image share one run.
	flights singleflight.Group

	mu       sync.Mutex
	cache    *simplelru.LRU[cacheKey, *entry]
	failures *simplelru.LRU[failureKey, failure]
	// gen counts Forget calls: a run that started before one does not
	// cache its answer, which may be what the registry just refused.
	gen uint64
	// failing is, per provider, whether it is in a failure burst, so that
	// a burst is logged once at Warn.
	failing []bool
}

var (
	_ upstream.Credentials = (*Providers)(nil)
	_ upstream.Forgetter   = (*Providers)(nil)
)

// cacheKey is one cached answer of a provider (by its index in the
// config): key is the image, the registry or "" by kind.
type cacheKey struct {
	provider int
	kind     string // keyImage, keyRegistry or keyGlobal
	key      string
}

// entry is a cached answer.
type entry struct {
	auth []authEntry
	// fresh is when it is to be refreshed: 9/10 of its duration, so that
	// credentials are renewed before the registry stops taking them.
	fresh time.Time
	// expires is when it stops being used at all, even if the plugin fails.
	expires time.Time
}

// failureKey is a provider's failures for one registry. The run that
// failed said no cache key type; the registry is the middle one, and a
// plugin that fails for one repository of a registry (its token endpoint
// down, its own credentials gone) mostly fails for all.
type failureKey struct {
	provider int
	registry string
}

type failure struct {
	until time.Time
	err   error
}

// New reads and validates the config (as kubelet does) and checks that
// every provider's plugin is an executable file in BinDir.
func New(opts Options) (*Providers, error) {
	if opts.ConfigFile == "" {
		return nil, errors.New("credprovider: no config file")
	}
	if opts.BinDir == "" {
		return nil, errors.New("credprovider: no plugin directory")
	}
	if opts.Timeout < 0 {
		return nil, fmt.Errorf("credprovider: negative timeout %v", opts.Timeout)
	}
	data, err := readConfig(opts.ConfigFile)
	if err != nil {
		return nil, err
	}
	provs, err := parseConfig(data)
	if err != nil {
		return nil, fmt.Errorf("%w (in %s)", err, opts.ConfigFile)
	}
	for _, p := range provs {
		p.bin = filepath.Join(opts.BinDir, p.name)
		if err := checkExecutable(p.bin); err != nil {
			return nil, fmt.Errorf("credprovider: provider %q: %w", p.name, err)
		}
	}
	c := &Providers{
		providers: provs,
		timeout:   opts.Timeout,
		backoff:   opts.FailureBackoff,
		now:       opts.Now,
		runner:    opts.Runner,
		log:       opts.Logger,
		metrics:   opts.Metrics,
		failing:   make([]bool, len(provs)),
	}
	if c.timeout == 0 {
		c.timeout = DefaultTimeout
	}
	if c.backoff == 0 {
		c.backoff = DefaultFailureBackoff
	}
	if c.now == nil {
		c.now = time.Now
	}
	if c.runner == nil {
		c.runner = ExecRunner{}
	}
	if c.log == nil {
		c.log = slog.New(slog.DiscardHandler)
	}
	// NewLRU fails only for a size <= 0.
	c.cache, _ = simplelru.NewLRU[cacheKey, *entry](maxCacheEntries, nil)
	c.failures, _ = simplelru.NewLRU[failureKey, failure](maxFailureEntries, nil)
	return c, nil
}

// readConfig reads the config file, bounded.
func readConfig(name string) ([]byte, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, fmt.Errorf("credprovider: config: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxConfigSize+1))
	if err != nil {
		return nil, fmt.Errorf("credprovider: config: %w", err)
	}
	if len(data) > maxConfigSize {
		return nil, fmt.Errorf("credprovider: config %s: larger than %d bytes", name, maxConfigSize)
	}
	return data, nil
}

// checkExecutable says why bin cannot be run as a plugin.
func checkExecutable(bin string) error {
	fi, err := os.Stat(bin)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("plugin %s does not exist", bin)
	case err != nil:
		return fmt.Errorf("plugin %s: %w", bin, err)
	case !fi.Mode().IsRegular():
		return fmt.Errorf("plugin %s is not a regular file", bin)
	case fi.Mode().Perm()&0o111 == 0:
		return fmt.Errorf("plugin %s is not executable", bin)
	}
	return nil
}

// imageName is what plugins are asked about and patterns match:
// REGISTRY/REPO, as kubelet names a pulled image without tag or digest.
func imageName(registry, repo string) string {
	if repo == "" {
		return registry
	}
	return registry + "/" + repo
}

// match is the index of the first provider (in config order, as kubelet)
// whose matchImages match image, or -1.
func (c *Providers) match(image string) int {
	for i, p := range c.providers {
		if p.matches(image) {
			return i
		}
	}
	return -1
}

func (p *provider) matches(image string) bool {
	for _, m := range p.matchImages {
		if matchStr(m, image) {
			return true
		}
	}
	return false
}

// keys are the cache keys that may answer image, in the order kubelet
// consults them.
func keys(provider int, registry, image string) [3]cacheKey {
	return [3]cacheKey{
		{provider, keyImage, image},
		{provider, keyRegistry, registry},
		{provider, keyGlobal, ""},
	}
}

// Lookup implements upstream.Credentials: the credential the first
// provider matching registry/repo gives for it, from the cache or by
// running its plugin.
func (c *Providers) Lookup(ctx context.Context, registry, repo string) (upstream.Credential, error) {
	if registry == "" {
		return upstream.Credential{}, upstream.ErrNoCredentials
	}
	image := imageName(registry, repo)
	pi := c.match(image)
	if pi < 0 {
		return upstream.Credential{}, upstream.ErrNoCredentials
	}
	if e := c.cached(pi, registry, image, false); e != nil {
		return answer(e, registry, image)
	}
	if err := c.backingOff(pi, registry); err != nil {
		return c.fallback(pi, registry, image, err)
	}
	ch := c.flights.DoChan(strconv.Itoa(pi)+"\x00"+image, func() (any, error) {
		// Not the caller's cancellation: the run is shared by every
		// waiter, and its answer is cached for the next ones.
		return c.refresh(context.WithoutCancel(ctx), pi, registry, image)
	})
	select {
	case r := <-ch:
		if r.Err != nil {
			return c.fallback(pi, registry, image, r.Err)
		}
		return answer(r.Val.(*entry), registry, image)
	case <-ctx.Done():
		return upstream.Credential{}, fmt.Errorf("credprovider: %w", context.Cause(ctx))
	}
}

// answer picks image's credential from e.
func answer(e *entry, registry, image string) (upstream.Credential, error) {
	cred, ok := pickAuth(e.auth, registry, image)
	if !ok || (cred.Username == "" && cred.Password == "") {
		// Nothing to authenticate with: anonymous, as without a plugin.
		return upstream.Credential{}, upstream.ErrNoCredentials
	}
	return cred, nil
}

// fallback answers from a cached entry that is due for refresh but not
// expired, when refreshing it failed; else it returns err.
func (c *Providers) fallback(pi int, registry, image string, err error) (upstream.Credential, error) {
	if e := c.cached(pi, registry, image, true); e != nil {
		return answer(e, registry, image)
	}
	return upstream.Credential{}, err
}

// cached is the entry of provider pi that answers image: a fresh one, or
// with stale also one due for refresh but not yet expired; nil if none.
func (c *Providers) cached(pi int, registry, image string, stale bool) *entry {
	now := c.now()
	c.mu.Lock()
	defer c.mu.Unlock()
	var due *entry
	for _, k := range keys(pi, registry, image) {
		e, ok := c.cache.Get(k)
		if !ok {
			continue
		}
		switch {
		case now.Before(e.fresh):
			return e
		case !now.Before(e.expires):
			c.cache.Remove(k)
		case due == nil:
			due = e
		}
	}
	if stale {
		return due
	}
	return nil
}

// backingOff returns the error of a recent failure of provider pi for
// registry, nil if there is none.
func (c *Providers) backingOff(pi int, registry string) error {
	now := c.now()
	c.mu.Lock()
	defer c.mu.Unlock()
	k := failureKey{pi, registry}
	f, ok := c.failures.Get(k)
	if !ok {
		return nil
	}
	if now.Before(f.until) {
		return f.err
	}
	c.failures.Remove(k)
	return nil
}

// refresh runs provider pi's plugin for image and caches its answer.
func (c *Providers) refresh(ctx context.Context, pi int, registry, image string) (*entry, error) {
	// A run for another image of the registry may have cached an answer
	// for the whole registry (or all) while this one waited to start.
	if e := c.cached(pi, registry, image, false); e != nil {
		return e, nil
	}
	p := c.providers[pi]
	c.mu.Lock()
	gen := c.gen
	c.mu.Unlock()

	resp, err := c.run(ctx, p, image)
	if err != nil {
		return nil, c.failed(ctx, pi, registry, image, err)
	}
	c.metrics.CredentialProviderRun(p.name, "ok")
	now := c.now()
	d := p.defaultCacheDuration
	if resp.cacheDuration != nil {
		d = *resp.cacheDuration
	}
	e := &entry{auth: resp.auth, fresh: now.Add(d - d/10), expires: now.Add(d)}

	c.mu.Lock()
	defer c.mu.Unlock()
	c.failures.Remove(failureKey{pi, registry})
	if c.failing[pi] {
		c.failing[pi] = false
		c.log.Info("credential provider works again", "provider", p.name, "image", image)
	}
	if d > 0 && gen == c.gen {
		k := cacheKey{provider: pi, kind: resp.cacheKeyType}
		switch resp.cacheKeyType {
		case keyImage:
			k.key = image
		case keyRegistry:
			k.key = registry
		}
		c.cache.Add(k, e)
	}
	return e, nil
}

// run runs p's plugin for image, bounded by the timeout.
func (c *Providers) run(ctx context.Context, p *provider, image string) (*response, error) {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	req, err := json.Marshal(request{APIVersion: p.apiVersion, Kind: "CredentialProviderRequest", Image: image})
	if err != nil {
		return nil, err
	}
	// Read at each run, as kubelet does: the node's environment may carry
	// what the plugin needs (AWS_*, proxies), the config's entries win.
	env := append(os.Environ(), p.env...)
	out, err := c.runner.Run(ctx, p.bin, p.args, env, req)
	if err != nil {
		if ctx.Err() != nil {
			return nil, &timeoutError{after: c.timeout, err: err}
		}
		return nil, err
	}
	return parseResponse(out, p.apiVersion)
}

// timeoutError is a run that did not finish in time.
type timeoutError struct {
	after time.Duration
	err   error
}

func (e *timeoutError) Error() string { return fmt.Sprintf("timed out after %v", e.after) }
func (e *timeoutError) Unwrap() error { return e.err }

// failed counts, logs and remembers a failed run of provider pi, and
// returns the error Lookup reports: ErrNoCredentials, so that the caller
// goes on anonymously.
func (c *Providers) failed(ctx context.Context, pi int, registry, image string, err error) error {
	p := c.providers[pi]
	result := "failed"
	var te *timeoutError
	if errors.As(err, &te) {
		result = "timeout"
	}
	c.metrics.CredentialProviderRun(p.name, result)
	err = fmt.Errorf("%w: credential provider %s: %w", upstream.ErrNoCredentials, p.name, err)

	var stderr string
	if re := (*RunError)(nil); errors.As(err, &re) && len(re.Stderr) > 0 {
		stderr = strings.ToValidUTF8(string(re.Stderr[:min(len(re.Stderr), maxStderr)]), "?")
	}
	now := c.now()
	c.mu.Lock()
	burst := c.failing[pi]
	c.failing[pi] = true
	if c.backoff > 0 {
		c.failures.Add(failureKey{pi, registry}, failure{until: now.Add(c.backoff), err: err})
	}
	c.mu.Unlock()
	level := slog.LevelWarn
	if burst {
		level = slog.LevelDebug // logged at Warn when the burst began
	}
	attrs := []any{"provider", p.name, "image", image, "reason", err.Error()}
	if stderr != "" {
		attrs = append(attrs, "stderr", stderr)
	}
	c.log.Log(ctx, level, "credential provider failed; pulling without its credentials", attrs...)
	return err
}

// Forget implements upstream.Forgetter: it drops every cached answer that
// would answer registry/repo (of every provider matching it), so the next
// Lookup runs the plugin again.
func (c *Providers) Forget(registry, repo string) {
	image := imageName(registry, repo)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gen++
	for pi, p := range c.providers {
		if !p.matches(image) {
			continue
		}
		for _, k := range keys(pi, registry, image) {
			c.cache.Remove(k)
		}
	}
}
