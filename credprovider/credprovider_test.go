package credprovider

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/registry-proxy/registry-proxy/internal/fakeclock"
	"github.com/registry-proxy/registry-proxy/metrics"
	"github.com/registry-proxy/registry-proxy/proxy/upstream"
)

const v1 = "credentialprovider.kubelet.k8s.io/v1"

func TestMatch(t *testing.T) {
	for _, tc := range []struct {
		glob, target string
		want         bool
	}{
		// kubelet's documented examples (CredentialProvider.matchImages).
		{"*.kubernetes.io", "abcde.kubernetes.io", true},
		{"*.*.kubernetes.io", "abcde.xyz.kubernetes.io", true},
		{"prefix.*.io", "prefix.kubernetes.io", true},
		{"*-good.kubernetes.io", "prefix-good.kubernetes.io", true},
		// A glob covers one host part, never zero or two.
		{"*.kubernetes.io", "kubernetes.io", false},
		{"*.kubernetes.io", "a.b.kubernetes.io", false},
		{"*.k8s.io", "a.k8s.io/team/app", true},
		{"*", "localhost", true},
		{"*", "localhost/team/app", true},
		{"*", "docker.io/library/nginx", false},
		{"*.*", "docker.io/library/nginx", true},
		{"docker.io", "docker.io/library/nginx", true},
		{"docker.io", "index.docker.io/library/nginx", false},
		{"docker.io/library", "docker.io/library/nginx", true},
		{"docker.io/library", "docker.io/team/app", false},
		// Ports must be equal, and are not globbed.
		{"registry.io:8080/path", "registry.io:8080/path/image", true},
		{"registry.io:8080", "registry.io/image", false},
		{"registry.io", "registry.io:8080/image", false},
		{"registry.io:*", "registry.io:8080/image", false},
		{"127.0.0.1:5000", "127.0.0.1:5000/team/app", true},
		{"127.0.0.1:5000/team", "127.0.0.1:5000/team/app", true},
		{"127.0.0.1:5000/team", "127.0.0.1:5000/other/app", false},
		{"127.0.0.1:5000/team", "127.0.0.1:5001/team/app", false},
		{"127.0.0.1:5000/team", "127.0.0.1/team/app", false},
		{"127.0.0.1:5000/team/app/more", "127.0.0.1:5000/team/app", false},
		// The path is a string prefix, as kubelet's.
		{"127.0.0.1:5000/team", "127.0.0.1:5000/teams/app", true},
		{"*.*.*.*:5000", "127.0.0.1:5000/team/app", true},
		// Cloud registries as their plugins' docs configure them.
		{"*.dkr.ecr.*.amazonaws.com", "123.dkr.ecr.us-east-1.amazonaws.com/team/app", true},
		{"*.dkr.ecr.*.amazonaws.com.cn", "123.dkr.ecr.us-east-1.amazonaws.com/team/app", false},
		{"*.azurecr.io", "x.azurecr.io/app", true},
		{"*-docker.pkg.dev", "europe-docker.pkg.dev/p/r/app", true},
		// Only '*' globs in practice: kubelet parses patterns as URLs, where
		// '[' is an IP literal and '?' starts a query.
		{"[a-c].io", "b.io/x", false},
		{"x[a-c].io", "xb.io/x", false},
		{"a?.io", "ab.io/x", false},
		// A scheme on the pattern is allowed (kubelet would never match it).
		{"https://registry.io", "registry.io/x", true},
		// Malformed: never a match.
		{"[.io", "a.io/x", false},
		{"registry.io", "", false},
	} {
		if got := matchStr(tc.glob, tc.target); got != tc.want {
			t.Errorf("matchStr(%q, %q) = %v, want %v", tc.glob, tc.target, got, tc.want)
		}
	}
}

func TestPickAuth(t *testing.T) {
	cred := func(u string) upstream.Credential { return upstream.Credential{Username: u, Password: "p-" + u} }
	for _, tc := range []struct {
		name     string
		keys     []string
		registry string
		repo     string
		want     string // username, "" for none
	}{
		{"host", []string{"registry.io"}, "registry.io", "team/app", "registry.io"},
		{"longest path wins", []string{"registry.io", "registry.io/team", "registry.io/team/app", "registry.io/other"}, "registry.io", "team/app", "registry.io/team/app"},
		{"shorter when longer does not match", []string{"registry.io", "registry.io/other"}, "registry.io", "team/app", "registry.io"},
		{"literal before glob", []string{"*.k8s.io", "a.k8s.io"}, "a.k8s.io", "x", "a.k8s.io"},
		{"glob", []string{"*.k8s.io"}, "a.k8s.io", "x", "*.k8s.io"},
		{"scheme dropped", []string{"https://registry.io"}, "registry.io", "x", "https://registry.io"},
		{"v2 path dropped", []string{"https://registry.io/v2/"}, "registry.io", "x", "https://registry.io/v2/"},
		{"port", []string{"127.0.0.1:5000"}, "127.0.0.1:5000", "team/app", "127.0.0.1:5000"},
		{"port differs", []string{"127.0.0.1"}, "127.0.0.1:5000", "team/app", ""},
		{"docker hub key", []string{"https://index.docker.io/v1/"}, "docker.io", "library/nginx", "https://index.docker.io/v1/"},
		{"docker hub key not for others", []string{"https://index.docker.io/v1/"}, "quay.io", "x", ""},
		{"docker.io key", []string{"docker.io", "https://index.docker.io/v1/"}, "docker.io", "library/nginx", "docker.io"},
		{"none", []string{"other.io"}, "registry.io", "x", ""},
		{"unparseable key ignored", []string{"[::1", "registry.io"}, "registry.io", "x", "registry.io"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var auth []authEntry
			for _, k := range tc.keys {
				if e, ok := newAuthEntry(k, cred(k)); ok {
					auth = append(auth, e)
				}
			}
			sortAuth(auth)
			got, ok := pickAuth(auth, tc.registry, imageName(tc.registry, tc.repo))
			if tc.want == "" {
				if ok {
					t.Fatalf("picked %q, want none", got.Username)
				}
				return
			}
			if !ok || got != cred(tc.want) {
				t.Fatalf("picked %q (%v), want %q", got.Username, ok, tc.want)
			}
		})
	}
}

const goodConfig = `apiVersion: kubelet.config.k8s.io/v1
kind: CredentialProviderConfig
providers:
  - name: ecr-credential-provider
    matchImages:
      - "*.dkr.ecr.*.amazonaws.com"
      - "*.dkr.ecr.*.amazonaws.com.cn"
    defaultCacheDuration: "12h"
    apiVersion: credentialprovider.kubelet.k8s.io/v1
    args: [get-credentials]
    env:
      - name: AWS_PROFILE
        value: temp
    someFutureField: ignored
`

func TestParseConfig(t *testing.T) {
	provs, err := parseConfig([]byte(goodConfig))
	if err != nil {
		t.Fatal(err)
	}
	if len(provs) != 1 {
		t.Fatalf("%d providers", len(provs))
	}
	p := provs[0]
	if p.name != "ecr-credential-provider" || p.defaultCacheDuration != 12*time.Hour || p.apiVersion != v1 ||
		!slices.Equal(p.args, []string{"get-credentials"}) || !slices.Equal(p.env, []string{"AWS_PROFILE=temp"}) ||
		len(p.matchImages) != 2 {
		t.Fatalf("parsed %+v", p)
	}

	base := func(provider string) string {
		return "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n" + provider
	}
	prov := func(fields string) string {
		return base("- name: p\n  matchImages: ['registry.io']\n  defaultCacheDuration: 1h\n  apiVersion: " + v1 + "\n" + fields)
	}
	for _, tc := range []struct {
		name, config, wantErr string
	}{
		{"ok", prov(""), ""},
		{"json", `{"apiVersion":"kubelet.config.k8s.io/v1","kind":"CredentialProviderConfig","providers":[{"name":"p","matchImages":["*.io"],"defaultCacheDuration":"0s","apiVersion":"` + v1 + `"}]}`, ""},
		{"v1beta1", strings.Replace(prov(""), "kubelet.config.k8s.io/v1", "kubelet.config.k8s.io/v1beta1", 1), ""},
		{"v1alpha1 plugin", base("- name: p\n  matchImages: ['registry.io']\n  defaultCacheDuration: 1h\n  apiVersion: credentialprovider.kubelet.k8s.io/v1alpha1\n"), ""},
		{"unknown fields", prov("  newField: {a: 1}\n  tokenAttributes: null\n"), ""},
		{"not yaml", "providers: [", "config"},
		{"no apiVersion", strings.Replace(prov(""), "apiVersion: kubelet.config.k8s.io/v1\n", "", 1), "apiVersion: required"},
		{"bad apiVersion", strings.Replace(prov(""), "kubelet.config.k8s.io/v1", "kubelet.config.k8s.io/v2", 1), `apiVersion "kubelet.config.k8s.io/v2"`},
		{"bad kind", strings.Replace(prov(""), "kind: CredentialProviderConfig", "kind: KubeletConfiguration", 1), `kind "KubeletConfiguration"`},
		{"no providers", base(""), "at least one provider"},
		{"no name", base("- matchImages: ['registry.io']\n  defaultCacheDuration: 1h\n  apiVersion: " + v1 + "\n"), "providers[0].name: required"},
		{"name with slash", strings.Replace(prov(""), "name: p", "name: ../bin/sh", 1), "without '/'"},
		{"name dot", strings.Replace(prov(""), "name: p", `name: "."`, 1), `must not be "."`},
		{"name dotdot", strings.Replace(prov(""), "name: p", `name: ".."`, 1), `must not be ".."`},
		{"name space", strings.Replace(prov(""), "name: p", `name: "a b"`, 1), "spaces"},
		{"duplicate", base("- name: p\n  matchImages: ['a.io']\n  defaultCacheDuration: 1h\n  apiVersion: " + v1 + "\n- name: p\n  matchImages: ['b.io']\n  defaultCacheDuration: 1h\n  apiVersion: " + v1 + "\n"), "duplicate"},
		{"no matchImages", strings.Replace(prov(""), "  matchImages: ['registry.io']\n", "", 1), "matchImages: at least one"},
		{"empty matchImages", strings.Replace(prov(""), "['registry.io']", "[]", 1), "matchImages: at least one"},
		{"bad glob", strings.Replace(prov(""), "['registry.io']", "['[.io']", 1), `"[.io" is invalid`},
		{"empty pattern", strings.Replace(prov(""), "['registry.io']", "['']", 1), `"" is invalid`},
		{"bad url", strings.Replace(prov(""), "['registry.io']", "['a.io:port:x']", 1), `"a.io:port:x" is invalid`},
		{"port glob", strings.Replace(prov(""), "['registry.io']", "['registry.io:*']", 1), `"registry.io:*" is invalid`},
		{"question mark", strings.Replace(prov(""), "['registry.io']", "['a?.io']", 1), `'?' and '#' are not globs`},
		{"no defaultCacheDuration", strings.Replace(prov(""), "  defaultCacheDuration: 1h\n", "", 1), "defaultCacheDuration: required"},
		{"bad defaultCacheDuration", strings.Replace(prov(""), "defaultCacheDuration: 1h", "defaultCacheDuration: 1 day", 1), `"1 day" is not a duration`},
		{"negative defaultCacheDuration", strings.Replace(prov(""), "defaultCacheDuration: 1h", "defaultCacheDuration: -1h", 1), "greater than or equal to 0"},
		{"no plugin apiVersion", strings.Replace(prov(""), "  apiVersion: "+v1+"\n", "", 1), "providers[0] (\"p\").apiVersion: required"},
		{"bad plugin apiVersion", strings.Replace(prov(""), v1, "credentialprovider.kubelet.k8s.io/v2", 1), `"credentialprovider.kubelet.k8s.io/v2": not`},
		{"bad env", prov("  env: [{name: 'A=B', value: x}]\n"), "invalid variable name"},
		{"token attributes", prov("  tokenAttributes: {serviceAccountTokenAudience: x, requireServiceAccount: true}\n"), "service account token providers are not supported"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseConfig([]byte(tc.config))
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("error %v", err)
			case tc.wantErr != "" && err == nil:
				t.Fatalf("no error, want %q", tc.wantErr)
			case tc.wantErr != "" && !strings.Contains(err.Error(), tc.wantErr):
				t.Fatalf("error %q, want it to contain %q", err, tc.wantErr)
			}
		})
	}
}

// writeFile writes data to dir/name with mode.
func writeFile(t *testing.T, dir, name, data string, mode os.FileMode) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(data), mode); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestNewChecksPlugins(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "bin")
	if err := os.Mkdir(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	config := func(name string) string {
		return writeFile(t, dir, "config.yaml", strings.Replace(goodConfig, "ecr-credential-provider", name, 1), 0o644)
	}
	writeFile(t, bin, "plain", "", 0o644)
	writeFile(t, bin, "ok", "#!/bin/sh\n", 0o755)
	if err := os.Mkdir(filepath.Join(bin, "adir"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ name, wantErr string }{
		{"ok", ""},
		{"missing", filepath.Join(bin, "missing") + " does not exist"},
		{"plain", filepath.Join(bin, "plain") + " is not executable"},
		{"adir", filepath.Join(bin, "adir") + " is not a regular file"},
	} {
		_, err := New(Options{ConfigFile: config(tc.name), BinDir: bin})
		switch {
		case tc.wantErr == "" && err != nil:
			t.Errorf("%s: %v", tc.name, err)
		case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
			t.Errorf("%s: error %v, want %q", tc.name, err, tc.wantErr)
		}
	}
	if _, err := New(Options{ConfigFile: filepath.Join(dir, "nope.yaml"), BinDir: bin}); err == nil {
		t.Error("missing config file: no error")
	}
	if _, err := New(Options{ConfigFile: config("ok")}); err == nil {
		t.Error("no BinDir: no error")
	}
	big := writeFile(t, dir, "big.yaml", strings.Repeat("#", maxConfigSize+1), 0o644)
	if _, err := New(Options{ConfigFile: big, BinDir: bin}); err == nil || !strings.Contains(err.Error(), "larger than") {
		t.Errorf("big config: %v", err)
	}
}

// resp is a plugin's stdout.
func resp(apiVersion, keyType string, duration *string, auth map[string][2]string) []byte {
	r := map[string]any{"apiVersion": apiVersion, "kind": "CredentialProviderResponse", "cacheKeyType": keyType}
	if duration != nil {
		r["cacheDuration"] = *duration
	}
	a := map[string]any{}
	for k, up := range auth {
		a[k] = map[string]string{"username": up[0], "password": up[1]}
	}
	r["auth"] = a
	b, err := json.Marshal(r)
	if err != nil {
		panic(err)
	}
	return b
}

func dur(s string) *string { return &s }

func TestParseResponse(t *testing.T) {
	auth := map[string][2]string{"registry.io": {"user", "s3cret-pass"}}
	for _, tc := range []struct {
		name    string
		out     string
		wantErr string
		check   func(*response) error
	}{
		{name: "ok", out: string(resp(v1, "Registry", dur("5m"), auth)), check: func(r *response) error {
			if r.cacheKeyType != "Registry" || r.cacheDuration == nil || *r.cacheDuration != 5*time.Minute || len(r.auth) != 1 {
				return fmt.Errorf("%+v", r)
			}
			return nil
		}},
		{name: "no duration", out: string(resp(v1, "Image", nil, auth)), check: func(r *response) error {
			if r.cacheDuration != nil {
				return fmt.Errorf("duration %v", *r.cacheDuration)
			}
			return nil
		}},
		{name: "negative duration", out: string(resp(v1, "Global", dur("-1m"), auth)), check: func(r *response) error {
			if r.cacheDuration == nil || *r.cacheDuration != 0 {
				return fmt.Errorf("duration %v", r.cacheDuration)
			}
			return nil
		}},
		{name: "no auth", out: `{"apiVersion":"` + v1 + `","kind":"CredentialProviderResponse","cacheKeyType":"Image"}`},
		{name: "wrong kind", out: strings.Replace(string(resp(v1, "Image", nil, auth)), `"CredentialProviderResponse"`, `"CredentialProviderRequest"`, 1), wantErr: `kind "CredentialProviderRequest" is not`},
		{name: "no kind", out: `{"apiVersion":"` + v1 + `","cacheKeyType":"Image"}`, wantErr: "kind"},
		{name: "mismatched apiVersion", out: string(resp("credentialprovider.kubelet.k8s.io/v1beta1", "Image", nil, auth)), wantErr: `apiVersion "credentialprovider.kubelet.k8s.io/v1beta1" does not match`},
		{name: "missing cacheKeyType", out: string(resp(v1, "", nil, auth)), wantErr: "no cacheKeyType"},
		{name: "bad cacheKeyType", out: string(resp(v1, "Repository", nil, auth)), wantErr: `cacheKeyType (not shown)`},
		{name: "bad duration", out: string(resp(v1, "Image", dur("forever"), auth)), wantErr: "cacheDuration is not a duration"},
		{name: "empty duration", out: string(resp(v1, "Image", dur(""), auth)), wantErr: "cacheDuration is not a duration"},
		{name: "not json", out: "Username: user\nPassword: s3cret-pass\n", wantErr: "not JSON"},
		{name: "empty", out: "", wantErr: "not"},
		{name: "trailing garbage", out: string(resp(v1, "Image", nil, auth)) + "s3cret-pass", wantErr: "not JSON"},
		{name: "array", out: "[]", wantErr: "not of type"},
		{name: "numeric password", out: `{"apiVersion":"` + v1 + `","kind":"CredentialProviderResponse","cacheKeyType":"Image","auth":{"registry.io":{"username":"u","password":987654321}}}`, wantErr: "not of type"},
		{name: "secret in kind", out: strings.Replace(string(resp(v1, "Image", nil, auth)), `"CredentialProviderResponse"`, `"s3cret-pass!"`, 1), wantErr: "kind (not shown)"},
		{name: "oversized", out: `{"apiVersion":"` + v1 + `","kind":"CredentialProviderResponse","cacheKeyType":"Image","x":"` + strings.Repeat("a", MaxResponseSize) + `"}`, wantErr: "exceeds"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, err := parseResponse([]byte(tc.out), v1)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want %q", err, tc.wantErr)
				}
				for _, secret := range []string{"s3cret", "987654321"} {
					if strings.Contains(err.Error(), secret) {
						t.Fatalf("error %q quotes the credential", err)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if tc.check != nil {
				if err := tc.check(r); err != nil {
					t.Fatal(err)
				}
			}
		})
	}
}

// fakeRunner is a Runner calling fn, counting runs per image.
type fakeRunner struct {
	fn func(ctx context.Context, req request) ([]byte, error)

	mu    sync.Mutex
	runs  []request
	bins  []string
	args  [][]string
	envs  [][]string
	total atomic.Int32
}

func (f *fakeRunner) Run(ctx context.Context, bin string, args, env []string, stdin []byte) ([]byte, error) {
	var req request
	if err := json.Unmarshal(stdin, &req); err != nil {
		return nil, err
	}
	f.mu.Lock()
	f.runs = append(f.runs, req)
	f.bins = append(f.bins, bin)
	f.args = append(f.args, args)
	f.envs = append(f.envs, env)
	f.mu.Unlock()
	f.total.Add(1)
	return f.fn(ctx, req)
}

func (f *fakeRunner) count() int { return int(f.total.Load()) }

// respond is a fakeRunner fn answering every request with one credential
// for the request's registry host.
func respond(keyType string, duration *string, password func() string) func(context.Context, request) ([]byte, error) {
	return func(_ context.Context, req request) ([]byte, error) {
		host, _, _ := strings.Cut(req.Image, "/")
		return resp(req.APIVersion, keyType, duration, map[string][2]string{host: {"user", password()}}), nil
	}
}

func constant(s string) func() string { return func() string { return s } }

type fixture struct {
	c       *Providers
	clock   *fakeclock.Clock
	runner  *fakeRunner
	logs    *syncBuffer
	metrics *metrics.Metrics
	bin     string
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// providerYAML is one provider of a config.
func providerYAML(name, defaultCache string, match ...string) string {
	q := make([]string, len(match))
	for i, m := range match {
		q[i] = fmt.Sprintf("%q", m)
	}
	return fmt.Sprintf("- name: %s\n  matchImages: [%s]\n  defaultCacheDuration: %q\n  apiVersion: %s\n  args: [--flag]\n  env: [{name: CRED_TEST_ENV, value: from-config}]\n",
		name, strings.Join(q, ", "), defaultCache, v1)
}

// newFixture is Providers over a fake runner running fn, with the given
// providers (providerYAML); every provider's binary exists.
func newFixture(t *testing.T, fn func(context.Context, request) ([]byte, error), providers ...string) *fixture {
	t.Helper()
	dir := t.TempDir()
	config := "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n" + strings.Join(providers, "")
	provs, err := parseConfig([]byte(config))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range provs {
		writeFile(t, dir, p.name, "#!/bin/sh\nexit 1\n", 0o755)
	}
	f := &fixture{
		clock:   fakeclock.New(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)),
		runner:  &fakeRunner{fn: fn},
		logs:    &syncBuffer{},
		metrics: metrics.New("test"),
		bin:     dir,
	}
	f.c, err = New(Options{
		ConfigFile: writeFile(t, t.TempDir(), "config.yaml", config, 0o644),
		BinDir:     dir,
		Now:        f.clock.Now,
		Runner:     f.runner,
		Logger:     slog.New(slog.NewJSONHandler(f.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Metrics:    f.metrics,
	})
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// lookup expects Lookup to answer password.
func (f *fixture) lookup(t *testing.T, registry, repo, password string) {
	t.Helper()
	cred, err := f.c.Lookup(context.Background(), registry, repo)
	if err != nil {
		t.Fatalf("Lookup(%s, %s): %v", registry, repo, err)
	}
	if cred.Password != password || cred.Username != "user" {
		t.Fatalf("Lookup(%s, %s) = %q/%q, want user/%q", registry, repo, cred.Username, cred.Password, password)
	}
}

// runs returns the number of runs of the fake plugin.
func (f *fixture) runs() int { return f.runner.count() }

// credRuns is the credential_provider_runs_total counter of provider and result.
func (f *fixture) credRuns(t *testing.T, provider, result string) float64 {
	t.Helper()
	mfs, err := f.metrics.Gatherer().Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if !strings.HasSuffix(mf.GetName(), "credential_provider_runs_total") {
			continue
		}
		for _, m := range mf.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			if labels["provider"] == provider && labels["result"] == result {
				return m.GetCounter().GetValue()
			}
		}
	}
	return 0
}

func TestLookupRequest(t *testing.T) {
	t.Setenv("CRED_TEST_NODE_ENV", "from-node")
	f := newFixture(t, respond("Image", nil, constant("pw")), providerYAML("ecr", "1h", "*.dkr.ecr.*.amazonaws.com"))
	f.lookup(t, "123.dkr.ecr.us-east-1.amazonaws.com", "team/app", "pw")
	if len(f.runner.runs) != 1 {
		t.Fatalf("%d runs", len(f.runner.runs))
	}
	req := f.runner.runs[0]
	if req != (request{APIVersion: v1, Kind: "CredentialProviderRequest", Image: "123.dkr.ecr.us-east-1.amazonaws.com/team/app"}) {
		t.Errorf("request %+v", req)
	}
	if f.runner.bins[0] != filepath.Join(f.bin, "ecr") || !slices.Equal(f.runner.args[0], []string{"--flag"}) {
		t.Errorf("ran %s %q", f.runner.bins[0], f.runner.args[0])
	}
	env := f.runner.envs[0]
	if !slices.Contains(env, "CRED_TEST_ENV=from-config") || !slices.Contains(env, "CRED_TEST_NODE_ENV=from-node") {
		t.Errorf("environment lacks the config's or the node's variables")
	}
	if got := f.credRuns(t, "ecr", "ok"); got != 1 {
		t.Errorf("ok runs counted %v", got)
	}
}

func TestLookupNoCredentials(t *testing.T) {
	fn := func(_ context.Context, req request) ([]byte, error) {
		auth := map[string][2]string{
			"registry.io/team": {"user", "pw"},
			"empty.io":         {"", ""},
			"token.io":         {"", "only-password"},
		}
		return resp(req.APIVersion, "Image", nil, auth), nil
	}
	f := newFixture(t, fn, providerYAML("p", "1h", "registry.io", "empty.io", "token.io", "*.other.io"))
	for _, tc := range []struct{ registry, repo string }{
		{"unmatched.io", "x"},      // no provider
		{"", "x"},                  // no registry
		{"registry.io", "other/x"}, // provider, but no auth key matches
		{"a.other.io", "x"},        // provider, auth for other registries only
		{"empty.io", "x"},          // an empty credential: anonymous
	} {
		_, err := f.c.Lookup(context.Background(), tc.registry, tc.repo)
		if err != upstream.ErrNoCredentials {
			t.Errorf("Lookup(%s, %s): %v, want ErrNoCredentials", tc.registry, tc.repo, err)
		}
	}
	cred, err := f.c.Lookup(context.Background(), "token.io", "x")
	if err != nil || cred != (upstream.Credential{Password: "only-password"}) {
		t.Errorf("password without username: %+v, %v", cred, err)
	}
	cred, err = f.c.Lookup(context.Background(), "registry.io", "team/app")
	if err != nil || cred != (upstream.Credential{Username: "user", Password: "pw"}) {
		t.Errorf("registry.io/team/app: %+v, %v", cred, err)
	}
}

func TestFirstProviderWins(t *testing.T) {
	fn := func(_ context.Context, req request) ([]byte, error) {
		return resp(req.APIVersion, "Image", nil, map[string][2]string{"*.io": {"user", "pw"}}), nil
	}
	f := newFixture(t, fn, providerYAML("first", "1h", "a.io"), providerYAML("second", "1h", "*.io"), providerYAML("third", "1h", "a.io"))
	f.lookup(t, "a.io", "x", "pw")
	f.lookup(t, "b.io", "x", "pw")
	if f.runner.bins[0] != filepath.Join(f.bin, "first") || f.runner.bins[1] != filepath.Join(f.bin, "second") {
		t.Errorf("ran %q", f.runner.bins)
	}
}

func TestCache(t *testing.T) {
	type step struct {
		advance  time.Duration
		registry string
		repo     string
		runs     int // total runs after the step
	}
	for _, tc := range []struct {
		name     string
		def      string // defaultCacheDuration
		keyType  string
		duration *string
		steps    []step
	}{
		{"fresh for 9/10 of cacheDuration", "1h", "Registry", dur("10m"), []step{
			{0, "a.io", "x", 1},
			{9*time.Minute - time.Second, "a.io", "x", 1},
			{time.Second, "a.io", "x", 2}, // 9m: refreshed before it expires at 10m
			{time.Minute, "a.io", "x", 2},
		}},
		{"cacheDuration 0 caches nothing", "1h", "Registry", dur("0s"), []step{
			{0, "a.io", "x", 1},
			{0, "a.io", "x", 2},
			{0, "a.io", "y", 3},
		}},
		{"defaultCacheDuration when absent", "1h", "Registry", nil, []step{
			{0, "a.io", "x", 1},
			{54*time.Minute - time.Second, "a.io", "x", 1},
			{time.Second, "a.io", "x", 2},
		}},
		{"defaultCacheDuration 0 caches nothing", "0s", "Registry", nil, []step{
			{0, "a.io", "x", 1},
			{0, "a.io", "x", 2},
		}},
		{"Image key", "1h", "Image", nil, []step{
			{0, "a.io", "x", 1},
			{0, "a.io", "x", 1},
			{0, "a.io", "y", 2},
			{0, "b.io", "x", 3},
			{0, "a.io", "y", 3},
		}},
		{"Registry key", "1h", "Registry", nil, []step{
			{0, "a.io", "x", 1},
			{0, "a.io", "y", 1},
			{0, "b.io", "x", 2},
			{0, "b.io", "z", 2},
		}},
		{"Global key", "1h", "Global", nil, []step{
			{0, "a.io", "x", 1},
			{0, "a.io", "y", 1},
			{0, "b.io", "x", 1}, // answered from the global entry, which has no b.io key
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t, respond(tc.keyType, tc.duration, constant("pw")), providerYAML("p", tc.def, "*.io"))
			for i, s := range tc.steps {
				f.clock.Add(s.advance)
				_, err := f.c.Lookup(context.Background(), s.registry, s.repo)
				if err != nil && !(tc.keyType == "Global" && s.registry == "b.io") {
					t.Fatalf("step %d: %v", i, err)
				}
				if got := f.runs(); got != s.runs {
					t.Fatalf("step %d (%s/%s): %d runs, want %d", i, s.registry, s.repo, got, s.runs)
				}
			}
		})
	}
}

func TestCachedCredentialRotates(t *testing.T) {
	var pw atomic.Value
	pw.Store("one")
	f := newFixture(t, respond("Registry", dur("10m"), func() string { return pw.Load().(string) }), providerYAML("p", "1h", "a.io"))
	f.lookup(t, "a.io", "x", "one")
	pw.Store("two")
	f.clock.Add(5 * time.Minute)
	f.lookup(t, "a.io", "x", "one") // cached
	f.clock.Add(4 * time.Minute)
	f.lookup(t, "a.io", "x", "two") // refreshed at 9/10
}

func TestSingleflight(t *testing.T) {
	release := make(chan struct{})
	started := make(chan struct{}, 100)
	fn := func(ctx context.Context, req request) ([]byte, error) {
		started <- struct{}{}
		<-release
		return respond("Image", nil, constant("pw"))(ctx, req)
	}
	f := newFixture(t, fn, providerYAML("p", "1h", "a.io"))
	const n = 20
	errs := make(chan error, n)
	for range n {
		go func() {
			cred, err := f.c.Lookup(context.Background(), "a.io", "x")
			if err == nil && cred.Password != "pw" {
				err = fmt.Errorf("password %q", cred.Password)
			}
			errs <- err
		}()
	}
	<-started
	// Let the others reach the flight; any arriving later find the cache,
	// so the count below holds whatever the scheduling.
	time.Sleep(20 * time.Millisecond)
	close(release)
	for range n {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if got := f.runs(); got != 1 {
		t.Fatalf("%d runs for %d concurrent Lookups, want 1", got, n)
	}
}

func TestWaiterCancelled(t *testing.T) {
	release := make(chan struct{})
	fn := func(ctx context.Context, req request) ([]byte, error) {
		<-release
		return respond("Image", nil, constant("pw"))(ctx, req)
	}
	f := newFixture(t, fn, providerYAML("p", "1h", "a.io"))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() {
		_, err := f.c.Lookup(ctx, "a.io", "x")
		done <- err
	}()
	for f.runs() == 0 {
		time.Sleep(time.Millisecond)
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled Lookup: %v", err)
	}
	// The run goes on for whoever asks next, and its answer is cached.
	close(release)
	f.lookup(t, "a.io", "x", "pw")
	if got := f.runs(); got != 1 {
		t.Fatalf("%d runs", got)
	}
}

func TestFailureBackoff(t *testing.T) {
	var failing atomic.Bool
	failing.Store(true)
	fn := func(ctx context.Context, req request) ([]byte, error) {
		if failing.Load() {
			return nil, &RunError{Err: errors.New("exit status 1"), Stderr: []byte("no credentials for you")}
		}
		return respond("Image", nil, constant("pw"))(ctx, req)
	}
	f := newFixture(t, fn, providerYAML("p", "1h", "*.io"))
	_, err := f.c.Lookup(context.Background(), "a.io", "x")
	if !errors.Is(err, upstream.ErrNoCredentials) || err == upstream.ErrNoCredentials {
		t.Fatalf("failure: %v, want an error wrapping ErrNoCredentials", err)
	}
	if !strings.Contains(err.Error(), "credential provider p") || !strings.Contains(err.Error(), "exit status 1") {
		t.Errorf("error %q lacks the provider or reason", err)
	}
	if strings.Contains(err.Error(), "no credentials for you") {
		t.Errorf("error %q carries stderr", err)
	}
	// Chain goes on past it, still ErrNoCredentials.
	if _, err := (upstream.Chain{f.c}).Lookup(context.Background(), "a.io", "x"); !errors.Is(err, upstream.ErrNoCredentials) {
		t.Errorf("through Chain: %v", err)
	}
	for _, repo := range []string{"x", "y"} {
		f.clock.Add(10 * time.Second)
		if _, err := f.c.Lookup(context.Background(), "a.io", repo); !errors.Is(err, upstream.ErrNoCredentials) {
			t.Fatalf("within backoff: %v", err)
		}
	}
	if got := f.runs(); got != 1 {
		t.Fatalf("%d runs within the backoff, want 1", got)
	}
	if _, err := f.c.Lookup(context.Background(), "b.io", "x"); !errors.Is(err, upstream.ErrNoCredentials) {
		t.Fatalf("other registry: %v", err)
	}
	if got := f.runs(); got != 2 {
		t.Fatalf("%d runs, want 2 (another registry is run)", got)
	}
	if got := f.credRuns(t, "p", "failed"); got != 2 {
		t.Errorf("failed runs counted %v", got)
	}
	// One Warn for the burst, with bounded stderr.
	if got := strings.Count(f.logs.String(), `"level":"WARN"`); got != 1 {
		t.Errorf("%d warnings in the burst, want 1:\n%s", got, f.logs)
	}
	if !strings.Contains(f.logs.String(), "no credentials for you") || !strings.Contains(f.logs.String(), `"provider":"p"`) {
		t.Errorf("log lacks stderr or provider:\n%s", f.logs)
	}
	f.clock.Add(10 * time.Second) // 30s after the first failure
	failing.Store(false)
	f.lookup(t, "a.io", "x", "pw")
	if got := f.runs(); got != 3 {
		t.Fatalf("%d runs, want 3 after the backoff", got)
	}
	if !strings.Contains(f.logs.String(), "works again") {
		t.Errorf("recovery not logged:\n%s", f.logs)
	}
	// A new burst warns again.
	failing.Store(true)
	f.clock.Add(2 * time.Hour)
	if _, err := f.c.Lookup(context.Background(), "a.io", "x"); !errors.Is(err, upstream.ErrNoCredentials) {
		t.Fatal(err)
	}
	if got := strings.Count(f.logs.String(), `"level":"WARN"`); got != 2 {
		t.Errorf("%d warnings after two bursts, want 2", got)
	}
}

func TestStaleWhenRefreshFails(t *testing.T) {
	var failing atomic.Bool
	fn := func(ctx context.Context, req request) ([]byte, error) {
		if failing.Load() {
			return []byte("garbage"), nil
		}
		return respond("Registry", dur("10m"), constant("pw"))(ctx, req)
	}
	f := newFixture(t, fn, providerYAML("p", "1h", "a.io"))
	f.lookup(t, "a.io", "x", "pw")
	failing.Store(true)
	f.clock.Add(9*time.Minute + 30*time.Second)
	// Due for refresh, the refresh fails: the still valid one is used.
	f.lookup(t, "a.io", "x", "pw")
	f.lookup(t, "a.io", "y", "pw") // within the backoff, still valid
	if got := f.runs(); got != 2 {
		t.Fatalf("%d runs, want 2", got)
	}
	f.clock.Add(30 * time.Second) // expired
	if _, err := f.c.Lookup(context.Background(), "a.io", "x"); !errors.Is(err, upstream.ErrNoCredentials) || err == upstream.ErrNoCredentials {
		t.Fatalf("expired and failing: %v", err)
	}
}

func TestTimeoutCounted(t *testing.T) {
	fn := func(ctx context.Context, req request) ([]byte, error) {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	f := newFixture(t, fn, providerYAML("p", "1h", "a.io"))
	f.c.timeout = 10 * time.Millisecond
	_, err := f.c.Lookup(context.Background(), "a.io", "x")
	if !errors.Is(err, upstream.ErrNoCredentials) || !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "timed out") {
		t.Fatalf("timeout: %v", err)
	}
	if got := f.credRuns(t, "p", "timeout"); got != 1 {
		t.Errorf("timeouts counted %v", got)
	}
}

func TestForget(t *testing.T) {
	for _, keyType := range []string{"Image", "Registry", "Global"} {
		t.Run(keyType, func(t *testing.T) {
			var n atomic.Int32
			pw := func() string { return fmt.Sprint("pw", n.Add(1)) }
			f := newFixture(t, respond(keyType, nil, pw), providerYAML("p", "1h", "*.io"), providerYAML("q", "1h", "b.io"))
			f.lookup(t, "a.io", "x", "pw1")
			f.c.Forget("c.io", "x") // answered by nothing cached for a.io/x... unless Global
			want := 2
			if keyType == "Global" {
				want = 3 // the global entry would have answered c.io/x
			}
			f.lookup(t, "a.io", "x", fmt.Sprint("pw", want-1))
			f.c.Forget("a.io", "x")
			f.lookup(t, "a.io", "x", fmt.Sprint("pw", want))
			if got := f.runs(); got != want {
				t.Fatalf("%d runs, want %d", got, want)
			}
		})
	}
}

func TestForgetDuringRun(t *testing.T) {
	release := make(chan struct{})
	var n atomic.Int32
	fn := func(ctx context.Context, req request) ([]byte, error) {
		if n.Add(1) == 1 {
			<-release
		}
		return respond("Registry", nil, constant(fmt.Sprint("pw", n.Load())))(ctx, req)
	}
	f := newFixture(t, fn, providerYAML("p", "1h", "a.io"))
	done := make(chan error)
	go func() {
		cred, err := f.c.Lookup(context.Background(), "a.io", "x")
		if err == nil && cred.Password != "pw1" {
			err = fmt.Errorf("password %q, want pw1", cred.Password)
		}
		done <- err
	}()
	for f.runs() == 0 {
		time.Sleep(time.Millisecond)
	}
	f.c.Forget("a.io", "x") // refused while the plugin runs: its answer is not cached
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	f.lookup(t, "a.io", "x", "pw2")
}

// TestNoSecretsLogged drives successes and every kind of failure and checks
// that no log line carries a credential.
func TestNoSecretsLogged(t *testing.T) {
	const secret = "s3cret-Passw0rd"
	outs := [][]byte{
		resp(v1, "Image", dur("0s"), map[string][2]string{"a.io": {"user", secret}}),
		[]byte(`{"kind":"CredentialProviderResponse","apiVersion":"` + v1 + `","auth":{"a.io":{"username":"user","password":"` + secret + `"}}}`),
		[]byte(`{"kind":"` + secret + `","apiVersion":"` + v1 + `","cacheKeyType":"Image"}`),
		[]byte(`{"kind":"CredentialProviderResponse","apiVersion":"` + secret + `","cacheKeyType":"Image"}`),
		[]byte(`{"kind":"CredentialProviderResponse","apiVersion":"` + v1 + `","cacheKeyType":"` + secret + `"}`),
		[]byte(`{"kind":"CredentialProviderResponse","apiVersion":"` + v1 + `","cacheKeyType":"Image","cacheDuration":"` + secret + `"}`),
		[]byte(`{"kind":"CredentialProviderResponse","apiVersion":"` + v1 + `","cacheKeyType":"Image","auth":{"a.io":{"username":"user","password":` + "12345678901234" + `}}}`),
		[]byte("username=user password=" + secret),
		[]byte(`{"auth":{"a.io":{"password":"` + secret + `"}}} trailing`),
	}
	var i atomic.Int32
	fn := func(ctx context.Context, req request) ([]byte, error) {
		return outs[int(i.Add(1)-1)%len(outs)], nil
	}
	f := newFixture(t, fn, providerYAML("p", "0s", "a.io"))
	f.c.backoff = -1
	for range 2 * len(outs) {
		_, _ = f.c.Lookup(context.Background(), "a.io", "x")
	}
	logs := f.logs.String()
	if !strings.Contains(logs, "credential provider failed") {
		t.Fatalf("no failure logged:\n%s", logs)
	}
	for _, s := range []string{secret, "12345678901234"} {
		if strings.Contains(logs, s) {
			t.Fatalf("log carries a credential:\n%s", logs)
		}
	}
}
