package upstream

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/metrics"
)

const testDigest = digest.Digest("sha256:0000000000000000000000000000000000000000000000000000000000000000")

// The dialer reaches loopback only where a configured URL names it: a
// registry name that resolves to loopback, and a redirect from a configured
// registry to another loopback port, are refused.
func TestGuardedDialer(t *testing.T) {
	var otherHits atomic.Int64
	other := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		otherHits.Add(1)
		w.Header().Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
		io.WriteString(w, "{}")
	}))
	defer other.Close()
	configured := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, other.URL+"/elsewhere", http.StatusTemporaryRedirect)
	}))
	defer configured.Close()
	otherURL, _ := url.Parse(other.URL)

	m := metrics.New("test")
	c, err := New(Options{
		Registries: map[string]string{"configured.test": configured.URL},
		// Allowed by name, but the name resolves to loopback.
		Allow:    []string{"localhost:" + otherURL.Port()},
		Attempts: 3,
		Metrics:  m,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := c.Manifest(ctx, http.MethodGet, "configured.test", "a/b", "latest", nil); !errors.Is(err, ErrForbiddenAddress) {
		t.Errorf("redirect to another loopback port: %v, want ErrForbiddenAddress", err)
	}
	// An allowed name is fetched over https; the dial itself is refused
	// before any TLS.
	if _, err := c.Manifest(ctx, http.MethodGet, "localhost:"+otherURL.Port(), "a/b", "latest", nil); !errors.Is(err, ErrForbiddenAddress) {
		t.Errorf("allowed name resolving to loopback: %v, want ErrForbiddenAddress", err)
	}
	if n := otherHits.Load(); n != 0 {
		t.Errorf("the unconfigured server was reached %d times", n)
	}
	// A refused dial is this node's own answer: tried once, not an outage.
	_, err = c.Manifest(ctx, http.MethodGet, "localhost:"+otherURL.Port(), "a/b", "latest", nil)
	if Unreachable(err) {
		t.Errorf("a refused address counts as the registry being unreachable: %v", err)
	}
	if n := failedRequests(t, m, "localhost:"+otherURL.Port()); n != 2 {
		t.Errorf("%v dial attempts for two requests to a refused address; want one each", n)
	}
	// The configured one itself is fine.
	c2, _ := New(Options{Registries: map[string]string{"other.test": other.URL}, Attempts: 1})
	resp, err := c2.Manifest(ctx, http.MethodGet, "other.test", "a/b", "latest", nil)
	if err != nil {
		t.Fatalf("configured loopback upstream: %v", err)
	}
	resp.Body.Close()
}

func TestSpecialAddresses(t *testing.T) {
	for _, tt := range []struct {
		addr string
		want bool
	}{
		{"127.0.0.1", true}, {"::1", true}, {"169.254.169.254", true}, {"10.1.2.3", true}, {"172.16.0.1", true},
		{"192.168.1.1", true}, {"100.64.0.1", true}, {"198.18.0.5", true}, {"0.0.0.0", true}, {"fe80::1", true},
		{"fd00::1", true}, {"::ffff:127.0.0.1", false /* unmapped by the caller */}, {"8.8.8.8", false}, {"2606:4700::1", false},
	} {
		ip := mustAddr(t, tt.addr)
		if tt.addr == "::ffff:127.0.0.1" {
			ip = ip.Unmap()
			tt.want = true
		}
		if got := special(ip); got != tt.want {
			t.Errorf("special(%s) = %v, want %v", tt.addr, got, tt.want)
		}
	}
}

func TestRedirectDowngradeRefused(t *testing.T) {
	mk := func(raw string) *http.Request { u, _ := url.Parse(raw); return &http.Request{URL: u} }
	if err := checkRedirect(mk("http://obj.example/x"), []*http.Request{mk("https://reg.example/v2/")}); err == nil {
		t.Error("https to http redirect followed")
	}
	if err := checkRedirect(mk("https://obj.example/x"), []*http.Request{mk("https://reg.example/v2/")}); err != nil {
		t.Errorf("https to https: %v", err)
	}
	if err := checkRedirect(mk("http://b/x"), []*http.Request{mk("http://a/")}); err != nil {
		t.Errorf("http to http: %v", err)
	}
}

// A client with node credentials answers a token challenge itself, with
// basic credentials at the token realm, and never sends a caller's
// Authorization.
func TestNodeCredentialsTokenFlow(t *testing.T) {
	var tokenCalls atomic.Int64
	var sawClientAuth atomic.Bool
	var srv *httptest.Server
	srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/token" {
			tokenCalls.Add(1)
			u, p, ok := r.BasicAuth()
			if !ok || u != "puller" || p != "s3cret" {
				w.WriteHeader(http.StatusUnauthorized)
				return
			}
			if r.URL.Query().Get("scope") != "repository:private/app:pull" || r.URL.Query().Get("service") != "reg" {
				http.Error(w, "bad scope "+r.URL.RawQuery, http.StatusBadRequest)
				return
			}
			fmt.Fprint(w, `{"token":"tok-1","expires_in":300}`)
			return
		}
		if r.Header.Get("Authorization") == "Bearer client-token" {
			sawClientAuth.Store(true)
		}
		if r.Header.Get("Authorization") != "Bearer tok-1" {
			w.Header().Set("WWW-Authenticate", `Bearer realm="`+srv.URL+`/token",service="reg",scope="repository:private/app:pull"`)
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		w.Header().Set("Content-Length", "42")
	}))
	defer srv.Close()
	base, err := New(Options{Registries: map[string]string{"reg.test": srv.URL}, Attempts: 1})
	if err != nil {
		t.Fatal(err)
	}
	creds := staticCreds{"reg.test": {Username: "puller", Password: "s3cret"}}
	c := base.WithNodeCredentials(creds)
	client := http.Header{"Authorization": []string{"Bearer client-token"}}
	for range 3 {
		size, err := c.BlobSize(context.Background(), "reg.test", "private/app", testDigest, client)
		if err != nil || size != 42 {
			t.Fatalf("BlobSize = %d, %v", size, err)
		}
	}
	if n := tokenCalls.Load(); n != 1 {
		t.Errorf("token fetched %d times, want once (cached)", n)
	}
	if sawClientAuth.Load() {
		t.Error("a client's Authorization reached the registry on a node's own fetch")
	}
	// Without credentials: anonymous token request, refused; the registry's
	// 401 comes back as a StatusError.
	anon := base.WithNodeCredentials(staticCreds{})
	var se *StatusError
	if _, err := anon.BlobSize(context.Background(), "reg.test", "private/app", testDigest, nil); !errors.As(err, &se) {
		t.Fatalf("anonymous node fetch of a private blob: %v, want a StatusError", err)
	}
	// The pass-through client hands the challenge back without asking for a token.
	before := tokenCalls.Load()
	if _, err := base.BlobSize(context.Background(), "reg.test", "private/app", testDigest, nil); !errors.As(err, &se) || se.Code != 401 {
		t.Fatalf("pass-through: %v, want 401", err)
	}
	if tokenCalls.Load() != before {
		t.Error("the pass-through client asked for a token")
	}
}

// failedRequests is the upstream_requests_total count of requests to host
// that got no answer.
func failedRequests(t *testing.T, m *metrics.Metrics, host string) float64 {
	t.Helper()
	fams, err := m.Gatherer().Gather()
	if err != nil {
		t.Fatal(err)
	}
	var n float64
	for _, f := range fams {
		if f.GetName() != "registry_proxy_upstream_requests_total" {
			continue
		}
		for _, mm := range f.GetMetric() {
			labels := map[string]string{}
			for _, l := range mm.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			if labels["host"] == host && labels["code"] == "error" {
				n += mm.GetCounter().GetValue()
			}
		}
	}
	return n
}

type staticCreds map[string]Credential

func (s staticCreds) Lookup(_ context.Context, registry, _ string) (Credential, error) {
	if c, ok := s[registry]; ok {
		return c, nil
	}
	return Credential{}, ErrNoCredentials
}

func TestParseChallenge(t *testing.T) {
	tests := []struct {
		in     string
		scheme string
		params map[string]string
		ok     bool
	}{
		{`Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull"`, "bearer",
			map[string]string{"realm": "https://auth.docker.io/token", "service": "registry.docker.io", "scope": "repository:library/alpine:pull"}, true},
		{`Basic realm="Registry Realm"`, "basic", map[string]string{"realm": "Registry Realm"}, true},
		{`Bearer realm=https://a/token, service=x`, "bearer", map[string]string{"realm": "https://a/token", "service": "x"}, true},
		{`Bearer realm="a\"b"`, "bearer", map[string]string{"realm": `a"b`}, true},
		{`Bearer realm="unterminated`, "", nil, false},
		{``, "", nil, false},
		{`Bearer realm`, "", nil, false},
	}
	for _, tt := range tests {
		c, err := ParseChallenge(tt.in)
		if (err == nil) != tt.ok {
			t.Errorf("ParseChallenge(%q) error %v, want ok=%v", tt.in, err, tt.ok)
			continue
		}
		if !tt.ok {
			continue
		}
		if c.Scheme != tt.scheme || fmt.Sprint(c.Params) != fmt.Sprint(tt.params) {
			t.Errorf("ParseChallenge(%q) = %v %v", tt.in, c.Scheme, c.Params)
		}
	}
}

func FuzzParseChallenge(f *testing.F) {
	f.Add(`Bearer realm="https://auth.docker.io/token",service="registry.docker.io"`)
	f.Add(`Basic realm="x"`)
	f.Fuzz(func(t *testing.T, s string) {
		c, err := ParseChallenge(s)
		if err != nil {
			return
		}
		if c.Scheme == "" || strings.ContainsAny(c.Scheme, " =,\"") {
			t.Fatalf("scheme %q from %q", c.Scheme, s)
		}
	})
}

func TestDockerConfig(t *testing.T) {
	cfg := []byte(`{"auths":{"https://index.docker.io/v1/":{"auth":"dXNlcjpwYXNz"},"ghcr.io":{"username":"u","password":"p"},"reg.example":{"registrytoken":"tok"}}}`)
	for _, tt := range []struct {
		registry string
		want     Credential
		err      error
	}{
		{"docker.io", Credential{Username: "user", Password: "pass"}, nil},
		{"ghcr.io", Credential{Username: "u", Password: "p"}, nil},
		{"reg.example", Credential{Token: "tok"}, nil},
		{"quay.io", Credential{}, ErrNoCredentials},
	} {
		got, err := parseDockerConfig(cfg, tt.registry)
		if got != tt.want || !errors.Is(err, tt.err) {
			t.Errorf("%s: %+v, %v", tt.registry, got, err)
		}
	}
}

func FuzzDockerConfig(f *testing.F) {
	f.Add([]byte(`{"auths":{"docker.io":{"auth":"dXNlcjpwYXNz"}}}`), "docker.io")
	f.Fuzz(func(t *testing.T, b []byte, registry string) {
		parseDockerConfig(b, registry) // must not panic
	})
}

func mustAddr(t *testing.T, s string) netip.Addr {
	t.Helper()
	a, err := netip.ParseAddr(s)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// rotatingCreds caches one password until told to forget it, as a
// credential provider's answer is cached for its duration.
type rotatingCreds struct {
	mu        sync.Mutex
	passwords []string // handed out in turn, one per refresh
	lookups   int
	forgotten []string
}

func (r *rotatingCreds) Lookup(context.Context, string, string) (Credential, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.lookups++
	return Credential{Username: "puller", Password: r.passwords[0]}, nil
}

func (r *rotatingCreds) Forget(registry, repo string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.forgotten = append(r.forgotten, registry+"/"+repo)
	if len(r.passwords) > 1 {
		r.passwords = r.passwords[1:]
	}
}

// A node credential the registry refuses while its source still has it
// cached (a plugin's answer that expired early, a rotated password) is
// forgotten and looked up again once: the fetch succeeds with the new one.
// A source that still has nothing better gets the registry's 401, after
// one more try, not a loop.
func TestNodeCredentialsRefreshedWhenRefused(t *testing.T) {
	for _, mode := range []string{"basic", "token"} {
		t.Run(mode, func(t *testing.T) {
			var current atomic.Pointer[string]
			pw := "old"
			current.Store(&pw)
			var srv *httptest.Server
			srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				u, p, ok := r.BasicAuth()
				good := ok && u == "puller" && p == *current.Load()
				if mode == "token" {
					if r.URL.Path == "/token" {
						if !good {
							w.WriteHeader(http.StatusUnauthorized)
							return
						}
						fmt.Fprintf(w, `{"token":"tok-%s","expires_in":300}`, p)
						return
					}
					good = r.Header.Get("Authorization") == "Bearer tok-"+*current.Load()
				}
				if !good {
					if mode == "token" {
						w.Header().Set("WWW-Authenticate", `Bearer realm="`+srv.URL+`/token",service="reg"`)
					} else {
						w.Header().Set("WWW-Authenticate", `Basic realm="reg"`)
					}
					w.WriteHeader(http.StatusUnauthorized)
					return
				}
				w.Header().Set("Content-Length", "42")
			}))
			defer srv.Close()
			base, err := New(Options{Registries: map[string]string{"reg.test": srv.URL}, Attempts: 1})
			if err != nil {
				t.Fatal(err)
			}
			creds := &rotatingCreds{passwords: []string{"old", "new"}}
			c := base.WithNodeCredentials(creds)
			if _, err := c.BlobSize(context.Background(), "reg.test", "private/app", testDigest, nil); err != nil {
				t.Fatalf("first fetch: %v", err)
			}
			next := "new"
			current.Store(&next) // the registry rotates
			if size, err := c.BlobSize(context.Background(), "reg.test", "private/app", testDigest, nil); err != nil || size != 42 {
				t.Fatalf("after rotation: %d, %v; want the refreshed credential to work", size, err)
			}
			if len(creds.forgotten) != 1 || creds.forgotten[0] != "reg.test/private/app" {
				t.Errorf("forgotten %v, want reg.test/private/app once", creds.forgotten)
			}
			gone := "neither"
			current.Store(&gone) // nothing the source has works any more
			var se *StatusError
			if _, err := c.BlobSize(context.Background(), "reg.test", "private/app", testDigest, nil); !errors.As(err, &se) || se.Code != 401 {
				t.Fatalf("with no working credential: %v, want the registry's 401", err)
			}
			if len(creds.forgotten) != 2 {
				t.Errorf("forgotten %d times in all, want one more try, not a loop", len(creds.forgotten))
			}
		})
	}
}
