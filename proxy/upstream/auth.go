package upstream

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"
)

// ErrNoCredentials means this node has no credentials configured for a registry.
var ErrNoCredentials = errors.New("upstream: no credentials configured")

// Credential is one registry's credentials of this node: a username and
// password (basic auth, or exchanged for a bearer token), or a token sent as is.
type Credential struct {
	Username, Password string
	Token              string
}

// Credentials are this node's own registry credentials, used only when it
// fetches on its peers' behalf, or for its own clients without credentials
// of a registry in access mode "node".
type Credentials interface {
	// Lookup returns the credentials for repo of registry,
	// ErrNoCredentials (or an error wrapping it) if there are none.
	Lookup(ctx context.Context, registry, repo string) (Credential, error)
}

// Forgetter is Credentials that caches what it found: Forget drops that
// for repo of registry, after the registry refused it, so that the next
// Lookup asks its source again (an expired credential is refreshed).
type Forgetter interface {
	Forget(registry, repo string)
}

// Chain is Credentials asking each in turn: the first that has credentials
// for a repository answers.
type Chain []Credentials

// Lookup implements Credentials.
func (c Chain) Lookup(ctx context.Context, registry, repo string) (Credential, error) {
	var errs []error
	for _, cr := range c {
		cred, err := cr.Lookup(ctx, registry, repo)
		if err == nil {
			return cred, nil
		}
		if !errors.Is(err, ErrNoCredentials) {
			return Credential{}, err
		}
		if err != ErrNoCredentials {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		// Why nothing was found (a plugin that failed), still ErrNoCredentials.
		return Credential{}, errors.Join(append([]error{ErrNoCredentials}, errs...)...)
	}
	return Credential{}, ErrNoCredentials
}

// Forget implements Forgetter for every member that caches.
func (c Chain) Forget(registry, repo string) {
	for _, cr := range c {
		if f, ok := cr.(Forgetter); ok {
			f.Forget(registry, repo)
		}
	}
}

// FileCredentials reads credentials from files at each use, so a mounted
// Kubernetes Secret may change under a running node.
type FileCredentials struct {
	// Registries maps a registry name to its files.
	Registries map[string]CredentialFiles
	// DockerConfig is a docker config.json ("auths"), consulted for
	// registries not in Registries.
	DockerConfig string
}

// CredentialFiles names the files of one registry's credentials.
type CredentialFiles struct {
	Username     string
	PasswordFile string
	TokenFile    string
}

// Lookup implements Credentials.
func (f FileCredentials) Lookup(_ context.Context, registry, _ string) (Credential, error) {
	if cf, ok := f.Registries[registry]; ok {
		if cf.TokenFile != "" {
			b, err := os.ReadFile(cf.TokenFile)
			if err != nil {
				return Credential{}, fmt.Errorf("upstream: credentials of %s: %w", registry, err)
			}
			return Credential{Token: strings.TrimSpace(string(b))}, nil
		}
		b, err := os.ReadFile(cf.PasswordFile)
		if err != nil {
			return Credential{}, fmt.Errorf("upstream: credentials of %s: %w", registry, err)
		}
		return Credential{Username: cf.Username, Password: strings.TrimRight(string(b), "\r\n")}, nil
	}
	if f.DockerConfig == "" {
		return Credential{}, ErrNoCredentials
	}
	b, err := os.ReadFile(f.DockerConfig)
	if err != nil {
		return Credential{}, fmt.Errorf("upstream: docker config: %w", err)
	}
	return parseDockerConfig(b, registry)
}

// parseDockerConfig finds registry's entry in a docker config.json.
func parseDockerConfig(b []byte, registry string) (Credential, error) {
	var cfg struct {
		Auths map[string]struct {
			Auth          string `json:"auth"`
			Username      string `json:"username"`
			Password      string `json:"password"`
			RegistryToken string `json:"registrytoken"`
		} `json:"auths"`
	}
	if err := json.Unmarshal(b, &cfg); err != nil {
		return Credential{}, fmt.Errorf("upstream: docker config: %w", err)
	}
	names := []string{registry, "https://" + registry, "http://" + registry}
	if registry == "docker.io" || registry == "index.docker.io" || registry == "registry-1.docker.io" {
		names = append(names, "https://index.docker.io/v1/", "index.docker.io", "registry-1.docker.io")
	}
	for key, a := range cfg.Auths {
		match := false
		for _, n := range names {
			match = match || strings.TrimSuffix(key, "/") == strings.TrimSuffix(n, "/")
		}
		if !match {
			continue
		}
		if a.RegistryToken != "" {
			return Credential{Token: a.RegistryToken}, nil
		}
		if a.Auth != "" {
			raw, err := base64.StdEncoding.DecodeString(a.Auth)
			if err != nil {
				return Credential{}, fmt.Errorf("upstream: docker config entry %s: %w", key, err)
			}
			user, pass, ok := strings.Cut(string(raw), ":")
			if !ok {
				return Credential{}, fmt.Errorf("upstream: docker config entry %s: auth is not user:password", key)
			}
			return Credential{Username: user, Password: pass}, nil
		}
		if a.Username != "" {
			return Credential{Username: a.Username, Password: a.Password}, nil
		}
	}
	return Credential{}, ErrNoCredentials
}

// Challenge is a parsed WWW-Authenticate header.
type Challenge struct {
	Scheme string // lower case: "bearer" or "basic"
	Params map[string]string
}

// ParseChallenge parses the first challenge of a WWW-Authenticate header:
// a scheme, then comma-separated key=value or key="quoted value" pairs.
func ParseChallenge(h string) (Challenge, error) {
	h = strings.TrimSpace(h)
	scheme, rest, _ := strings.Cut(h, " ")
	if scheme == "" || strings.ContainsAny(scheme, "=,\"") {
		return Challenge{}, fmt.Errorf("upstream: challenge %q: no scheme", h)
	}
	c := Challenge{Scheme: strings.ToLower(scheme), Params: map[string]string{}}
	for rest = strings.TrimSpace(rest); rest != ""; {
		k, after, ok := strings.Cut(rest, "=")
		if !ok {
			return Challenge{}, fmt.Errorf("upstream: challenge %q: parameter without value", h)
		}
		k = strings.ToLower(strings.TrimSpace(k))
		var v string
		if strings.HasPrefix(after, `"`) {
			var b strings.Builder
			i := 1
			for ; i < len(after) && after[i] != '"'; i++ {
				if after[i] == '\\' && i+1 < len(after) {
					i++
				}
				b.WriteByte(after[i])
			}
			if i >= len(after) {
				return Challenge{}, fmt.Errorf("upstream: challenge %q: unterminated quote", h)
			}
			v, rest = b.String(), after[i+1:]
		} else {
			v, rest, _ = strings.Cut(after, ",")
			v = strings.TrimSpace(v)
			rest = "," + rest
		}
		if k == "" {
			return Challenge{}, fmt.Errorf("upstream: challenge %q: empty parameter name", h)
		}
		c.Params[k] = v
		rest = strings.TrimSpace(rest)
		if rest != "" && rest[0] != ',' {
			return Challenge{}, fmt.Errorf("upstream: challenge %q: expected a comma", h)
		}
		rest = strings.TrimSpace(strings.TrimLeft(rest, ","))
	}
	return c, nil
}

// nodeAuth authenticates this node's own requests to a registry: it answers
// the registry's 401 challenge with this node's credentials (or anonymously,
// as public registries hand out pull tokens), caching bearer tokens per realm,
// service and scope until they expire.
type nodeAuth struct {
	c     *Client
	creds Credentials

	mu     sync.Mutex
	tokens map[string]token // by realm, service, scope and user
	last   map[string]token // the Authorization that worked, by registry and repository
}

// cached is the Authorization that last worked for registry and repo.
func (a *nodeAuth) cached(registry, repo string) string {
	a.mu.Lock()
	defer a.mu.Unlock()
	if t, ok := a.last[registry+"/"+repo]; ok && time.Now().Before(t.expires) {
		return t.value
	}
	return ""
}

func (a *nodeAuth) remember(registry, repo, v string, life time.Duration) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.last) > 4096 {
		clear(a.last)
	}
	a.last[registry+"/"+repo] = token{value: v, expires: time.Now().Add(life)}
}

// forget drops what this node cached for registry and repo (the
// Authorization, its tokens, the credential source's answer) after the
// registry refused it; false when the source caches nothing to refresh.
func (a *nodeAuth) forget(registry, repo string) bool {
	f, ok := a.creds.(Forgetter)
	if !ok {
		return false
	}
	a.mu.Lock()
	delete(a.last, registry+"/"+repo)
	clear(a.tokens) // keyed by realm and scope, not registry: refusals are rare
	a.mu.Unlock()
	f.Forget(registry, repo)
	return true
}

type token struct {
	value   string
	expires time.Time
}

// maxTokenBody bounds a token server's answer.
const maxTokenBody = 64 << 10

// authorize returns the Authorization for a request that got challenged, or
// "" with an error when this node cannot answer the challenge.
func (a *nodeAuth) authorize(ctx context.Context, registry, repo string, challenge string) (string, error) {
	cred, err := a.creds.Lookup(ctx, registry, repo)
	if err != nil && !errors.Is(err, ErrNoCredentials) {
		return "", err
	}
	anonymous := errors.Is(err, ErrNoCredentials)
	if cred.Token != "" {
		v := "Bearer " + cred.Token
		a.remember(registry, repo, v, time.Minute)
		return v, nil
	}
	ch, err := ParseChallenge(challenge)
	if err != nil {
		return "", err
	}
	switch ch.Scheme {
	case "basic":
		if anonymous {
			return "", ErrNoCredentials
		}
		v := "Basic " + base64.StdEncoding.EncodeToString([]byte(cred.Username+":"+cred.Password))
		a.remember(registry, repo, v, time.Minute)
		return v, nil
	case "bearer":
	default:
		return "", fmt.Errorf("upstream: challenge scheme %q not supported", ch.Scheme)
	}
	realm, err := url.Parse(ch.Params["realm"])
	if err != nil || (realm.Scheme != "https" && realm.Scheme != "http") || realm.Host == "" {
		return "", fmt.Errorf("%w: token realm %q", ErrBadResponse, ch.Params["realm"])
	}
	scope := ch.Params["scope"]
	if scope == "" && repo != "" {
		scope = "repository:" + repo + ":pull"
	}
	key := realm.String() + "|" + ch.Params["service"] + "|" + scope + "|" + cred.Username
	a.mu.Lock()
	if t, ok := a.tokens[key]; ok && time.Now().Before(t.expires) {
		a.mu.Unlock()
		a.remember(registry, repo, "Bearer "+t.value, time.Until(t.expires))
		return "Bearer " + t.value, nil
	}
	a.mu.Unlock()

	q := realm.Query()
	if s := ch.Params["service"]; s != "" {
		q.Set("service", s)
	}
	if scope != "" {
		q.Set("scope", scope)
	}
	realm.RawQuery = q.Encode()
	hdr := http.Header{}
	if !anonymous {
		hdr.Set("Authorization", "Basic "+base64.StdEncoding.EncodeToString([]byte(cred.Username+":"+cred.Password)))
	}
	resp, err := a.c.do(ctx, http.MethodGet, realm.String(), hdr, true)
	if err != nil {
		return "", fmt.Errorf("upstream: token from %s: %w", realm.Host, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("upstream: token from %s: %w", realm.Host, statusError(resp))
	}
	var tr struct {
		Token       string `json:"token"`
		AccessToken string `json:"access_token"`
		ExpiresIn   int    `json:"expires_in"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxTokenBody)).Decode(&tr); err != nil {
		return "", fmt.Errorf("%w: token from %s: %w", ErrBadResponse, realm.Host, err)
	}
	tok := tr.Token
	if tok == "" {
		tok = tr.AccessToken
	}
	if tok == "" {
		return "", fmt.Errorf("%w: token from %s: empty", ErrBadResponse, realm.Host)
	}
	life := time.Duration(tr.ExpiresIn) * time.Second
	if life <= 0 {
		life = 60 * time.Second // the distribution spec's default
	}
	a.mu.Lock()
	if len(a.tokens) > 1024 {
		clear(a.tokens)
	}
	// Renewed a little before it runs out.
	a.tokens[key] = token{value: tok, expires: time.Now().Add(life * 9 / 10)}
	a.mu.Unlock()
	a.remember(registry, repo, "Bearer "+tok, life*9/10)
	return "Bearer " + tok, nil
}
