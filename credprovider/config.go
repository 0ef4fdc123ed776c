package credprovider

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"sigs.k8s.io/yaml"
)

// configKind is the kind of kubelet's --image-credential-provider-config.
const configKind = "CredentialProviderConfig"

// maxConfigSize bounds the config file: kubelet's are a few hundred bytes.
const maxConfigSize = 1 << 20

// validConfigAPIVersion reports whether v is an apiVersion of kubelet's
// CredentialProviderConfig.
func validConfigAPIVersion(v string) bool {
	switch v {
	case "kubelet.config.k8s.io/v1", "kubelet.config.k8s.io/v1beta1", "kubelet.config.k8s.io/v1alpha1":
		return true
	}
	return false
}

// validPluginAPIVersion reports whether v is an apiVersion of the
// credential provider exec protocol (CredentialProviderRequest/Response).
func validPluginAPIVersion(v string) bool {
	switch v {
	case "credentialprovider.kubelet.k8s.io/v1", "credentialprovider.kubelet.k8s.io/v1beta1", "credentialprovider.kubelet.k8s.io/v1alpha1":
		return true
	}
	return false
}

// fileConfig is kubelet's CredentialProviderConfig as written in its file.
// Fields this mirror does not use are not declared: like kubelet's decoder
// it ignores unknown fields, so a config of a newer kubelet still loads.
type fileConfig struct {
	APIVersion string         `json:"apiVersion"`
	Kind       string         `json:"kind"`
	Providers  []fileProvider `json:"providers"`
}

type fileProvider struct {
	Name                 string   `json:"name"`
	MatchImages          []string `json:"matchImages"`
	DefaultCacheDuration *string  `json:"defaultCacheDuration"`
	APIVersion           string   `json:"apiVersion"`
	Args                 []string `json:"args"`
	Env                  []struct {
		Name  string `json:"name"`
		Value string `json:"value"`
	} `json:"env"`
	// TokenAttributes marks a provider that needs the pod's service
	// account token, which a node-wide mirror never has.
	TokenAttributes json.RawMessage `json:"tokenAttributes"`
}

// provider is one validated provider of the config.
type provider struct {
	name                 string
	matchImages          []string
	defaultCacheDuration time.Duration
	apiVersion           string
	args                 []string
	env                  []string // NAME=value, appended to os.Environ()
	bin                  string   // set by New: BinDir/name
}

// parseConfig parses and validates a CredentialProviderConfig (YAML or
// JSON) as kubelet does, reporting every problem at once.
func parseConfig(data []byte) ([]*provider, error) {
	var fc fileConfig
	if err := yaml.Unmarshal(data, &fc); err != nil {
		return nil, fmt.Errorf("credprovider: config: %w", err)
	}
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	switch {
	case fc.APIVersion == "":
		bad("apiVersion: required (kubelet.config.k8s.io/v1)")
	case !validConfigAPIVersion(fc.APIVersion):
		bad("apiVersion %q: not kubelet.config.k8s.io/v1, v1beta1 or v1alpha1", fc.APIVersion)
	}
	if fc.Kind != configKind {
		bad("kind %q: not %s", fc.Kind, configKind)
	}
	if len(fc.Providers) == 0 {
		bad("providers: at least one provider is required")
	}
	seen := map[string]bool{}
	var provs []*provider
	for i, fp := range fc.Providers {
		at := fmt.Sprintf("providers[%d]", i)
		if fp.Name != "" {
			at = fmt.Sprintf("providers[%d] (%q)", i, fp.Name)
		}
		p := &provider{name: fp.Name, apiVersion: fp.APIVersion, args: fp.Args}
		switch {
		case fp.Name == "":
			bad("%s.name: required", at)
		case strings.Contains(fp.Name, "/"):
			bad("%s.name: must be a file name in the plugin directory, without '/'", at)
		case strings.Contains(fp.Name, " "):
			bad("%s.name: must not contain spaces", at)
		case fp.Name == "." || fp.Name == "..":
			bad("%s.name: must not be %q", at, fp.Name)
		case strings.ContainsRune(fp.Name, 0):
			bad("%s.name: must not contain NUL", at)
		case seen[fp.Name]:
			bad("%s.name: duplicate provider name", at)
		}
		seen[fp.Name] = true
		if len(fp.MatchImages) == 0 {
			bad("%s.matchImages: at least one pattern is required", at)
		}
		for _, m := range fp.MatchImages {
			if err := checkPattern(m); err != nil {
				bad("%s.matchImages: %q is invalid: %v", at, m, err)
			}
		}
		p.matchImages = fp.MatchImages
		if fp.DefaultCacheDuration == nil {
			bad("%s.defaultCacheDuration: required (e.g. \"12h\"; \"0s\" caches nothing)", at)
		} else if d, err := time.ParseDuration(*fp.DefaultCacheDuration); err != nil {
			bad("%s.defaultCacheDuration: %q is not a duration", at, *fp.DefaultCacheDuration)
		} else if d < 0 {
			bad("%s.defaultCacheDuration: must be greater than or equal to 0", at)
		} else {
			p.defaultCacheDuration = d
		}
		switch {
		case fp.APIVersion == "":
			bad("%s.apiVersion: required (credentialprovider.kubelet.k8s.io/v1)", at)
		case !validPluginAPIVersion(fp.APIVersion):
			bad("%s.apiVersion %q: not credentialprovider.kubelet.k8s.io/v1, v1beta1 or v1alpha1", at, fp.APIVersion)
		}
		for _, e := range fp.Env {
			if e.Name == "" || strings.ContainsAny(e.Name, "=\x00") {
				bad("%s.env: invalid variable name %q", at, e.Name)
				continue
			}
			p.env = append(p.env, e.Name+"="+e.Value)
		}
		if t := bytes.TrimSpace(fp.TokenAttributes); len(t) > 0 && !bytes.Equal(t, []byte("null")) {
			bad("%s.tokenAttributes: service account token providers are not supported by this mirror: it pulls for the node, never with a pod's token", at)
		}
		provs = append(provs, p)
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("credprovider: config: %w", errors.Join(errs...))
	}
	return provs, nil
}
