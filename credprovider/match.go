package credprovider

import (
	"errors"
	"net"
	"net/url"
	"path"
	"sort"
	"strings"

	"github.com/registry-proxy/registry-proxy/proxy/upstream"
)

// This file is kubelet's matching of images against patterns
// (k8s.io/kubernetes pkg/credentialprovider: ParseSchemelessURL, SplitURL,
// URLsMatch and BasicDockerKeyring), reproduced so that a plugin configured
// for kubelet answers the same images here.

// parseSchemeless parses an image or a pattern, which has no scheme, as a
// URL. kubelet prefixes "https://" unconditionally; a pattern that already
// has an http(s) scheme (as docker config keys often do) is taken as is
// rather than never matching.
func parseSchemeless(s string) (*url.URL, error) {
	if !strings.HasPrefix(s, "https://") && !strings.HasPrefix(s, "http://") {
		s = "https://" + s
	}
	u, err := url.Parse(s)
	if err != nil {
		return nil, err
	}
	u.Scheme = ""
	return u, nil
}

// splitURL splits u's host into its dot-separated parts and its port.
func splitURL(u *url.URL) (parts []string, port string) {
	host, port, err := net.SplitHostPort(u.Host)
	if err != nil {
		// No port (or not parseable as one): the whole is the host.
		host, port = u.Host, ""
	}
	return strings.Split(host, "."), port
}

// urlsMatch reports whether target matches glob: the same port (ports are
// not globbed), the same number of host parts each matching its glob part
// (so *.k8s.io matches a.k8s.io but neither k8s.io nor a.b.k8s.io), and
// glob's path a prefix of target's.
func urlsMatch(glob, target *url.URL) (bool, error) {
	globParts, globPort := splitURL(glob)
	targetParts, targetPort := splitURL(target)
	if globPort != targetPort {
		return false, nil
	}
	if len(globParts) != len(targetParts) {
		return false, nil
	}
	// A string prefix, as kubelet's: "host/team" also matches "host/teams".
	if !strings.HasPrefix(target.Path, glob.Path) {
		return false, nil
	}
	for i, g := range globParts {
		ok, err := path.Match(g, targetParts[i])
		if err != nil {
			return false, err
		}
		if !ok {
			return false, nil
		}
	}
	return true, nil
}

// matchStr is urlsMatch on strings; anything unparseable does not match
// (kubelet ignores the error the same way).
func matchStr(glob, target string) bool {
	g, err := parseSchemeless(glob)
	if err != nil {
		return false
	}
	t, err := parseSchemeless(target)
	if err != nil {
		return false
	}
	ok, err := urlsMatch(g, t)
	return err == nil && ok
}

// checkPattern says why a matchImages entry can never be used. kubelet
// checks only that it parses; an empty host or a malformed glob would
// silently match nothing, so they are refused here too.
func checkPattern(p string) error {
	if p == "" {
		return errors.New("empty")
	}
	u, err := parseSchemeless(p)
	if err != nil {
		return err
	}
	if u.Host == "" {
		return errors.New("no registry host")
	}
	if u.RawQuery != "" || u.ForceQuery || u.Fragment != "" {
		return errors.New("it has a query or fragment ('?' and '#' are not globs here)")
	}
	parts, _ := splitURL(u)
	for _, part := range parts {
		if _, err := path.Match(part, ""); err != nil {
			return errors.New("malformed glob in host")
		}
	}
	return nil
}

// authEntry is one key of a plugin's answer with its credential, the key
// normalized as kubelet's keyring does.
type authEntry struct {
	key  string
	url  *url.URL // key parsed, once rather than at each Lookup
	cred upstream.Credential
}

// newAuthEntry is key of a plugin's auth map with its credential, false if
// key cannot match anything.
func newAuthEntry(key string, cred upstream.Credential) (authEntry, bool) {
	k, ok := normalizeAuthKey(key)
	if !ok {
		return authEntry{}, false
	}
	u, err := parseSchemeless(k)
	if err != nil {
		return authEntry{}, false
	}
	return authEntry{key: k, url: u, cred: cred}, true
}

// normalizeAuthKey turns a key of a plugin's auth map into what is matched
// against images: no scheme, and docker's "/v1/" or "/v2/" path prefix
// dropped (a key "https://index.docker.io/v1/" means the host).
func normalizeAuthKey(k string) (string, bool) {
	u, err := parseSchemeless(k)
	if err != nil || u.Host == "" {
		return "", false
	}
	p := u.Path
	if strings.HasPrefix(p, "/v2/") || strings.HasPrefix(p, "/v1/") {
		p = p[3:]
	}
	if p != "" && p != "/" {
		return u.Host + p, true
	}
	return u.Host, true
}

// sortAuth orders entries most specific first, as kubelet's keyring
// tries them: longer keys first, then reverse lexical order (so a literal
// "a.k8s.io" precedes the glob "*.k8s.io" of the same length). Keys that
// normalize alike ("x.io", "https://x.io/") are ordered by credential, so
// that the choice never depends on the order of a JSON map.
func sortAuth(auth []authEntry) {
	sort.Slice(auth, func(i, j int) bool {
		a, b := auth[i], auth[j]
		switch {
		case len(a.key) != len(b.key):
			return len(a.key) > len(b.key)
		case a.key != b.key:
			return a.key > b.key
		case a.cred.Username != b.cred.Username:
			return a.cred.Username < b.cred.Username
		}
		return a.cred.Password < b.cred.Password
	})
}

// dockerHubKey is the key docker writes for Docker Hub
// ("https://index.docker.io/v1/" normalized); kubelet uses it for Docker
// Hub images when no key matches them.
const dockerHubKey = "index.docker.io"

// isDockerHub reports whether registry is Docker Hub as containerd names it.
func isDockerHub(registry string) bool {
	switch registry {
	case "docker.io", "index.docker.io", "registry-1.docker.io":
		return true
	}
	return false
}

// pickAuth returns the credential of the most specific key of auth
// (sorted by sortAuth) that matches image, of registry.
func pickAuth(auth []authEntry, registry, image string) (upstream.Credential, bool) {
	target, err := parseSchemeless(image)
	if err != nil {
		return upstream.Credential{}, false
	}
	for _, a := range auth {
		if ok, err := urlsMatch(a.url, target); err == nil && ok {
			return a.cred, true
		}
	}
	if isDockerHub(registry) {
		for _, a := range auth {
			if a.key == dockerHubKey {
				return a.cred, true
			}
		}
	}
	return upstream.Credential{}, false
}
