package access

import (
	"path"
	"strings"
)

// Mode is whose credentials decide what a client may read.
type Mode string

const (
	// ClientMode: the client's own credentials decide; a client without
	// any reads only what the registry serves anonymously.
	ClientMode Mode = "client"
	// NodeMode: a client without credentials reads what this node's own
	// credentials can read, as kubelet's pulls (whose credentials containerd
	// never hands a mirror) need.
	NodeMode Mode = "node"
)

// Rule is one registry's access mode, for the repositories matching one of
// its patterns (all of them when there are none).
type Rule struct {
	Mode         Mode
	Repositories []string
}

// Policy maps registries and repositories to access modes; a registry
// without a rule, and a nil Policy, are in ClientMode.
type Policy struct {
	rules map[string]Rule
}

// NewPolicy returns the policy of rules by registry name (as containerd
// sends it in ns=). Patterns are checked by config.ValidRepositoryPattern.
func NewPolicy(rules map[string]Rule) *Policy {
	p := &Policy{rules: map[string]Rule{}}
	for name, r := range rules {
		if r.Mode == "" {
			r.Mode = ClientMode
		}
		p.rules[name] = r
	}
	return p
}

// Mode is the access mode of repo in registry.
func (p *Policy) Mode(registry, repo string) Mode {
	if p == nil {
		return ClientMode
	}
	r, ok := p.rules[registry]
	if !ok || (len(r.Repositories) > 0 && !matchAny(r.Repositories, repo)) {
		return ClientMode
	}
	return r.Mode
}

// Node reports whether clients read repo of registry with this node's
// credentials (NodeMode). Whatever a client sends is then not used: after
// one challenge containerd sends a mirror anonymous tokens for every
// repository of that host, which would otherwise turn node mode off for
// it. A client the node's credentials cannot serve gets the registry's
// 401 and pulls from the registry itself, with its own.
func (p *Policy) Node(registry, repo string) bool {
	return p.Mode(registry, repo) == NodeMode
}

// NodeRegistry reports whether every repository of registry is in NodeMode:
// its /v2/ need not challenge a client.
func (p *Policy) NodeRegistry(registry string) bool {
	if p == nil {
		return false
	}
	r, ok := p.rules[registry]
	return ok && r.Mode == NodeMode && len(r.Repositories) == 0
}

// matchAny reports whether repo matches one of patterns: path.Match ("*"
// stays within one path segment), or "prefix/**" for everything under
// prefix.
func matchAny(patterns []string, repo string) bool {
	for _, p := range patterns {
		if prefix, ok := strings.CutSuffix(p, "/**"); ok {
			if strings.HasPrefix(repo, prefix+"/") {
				return true
			}
			continue
		}
		if ok, _ := path.Match(p, repo); ok {
			return true
		}
	}
	return false
}
