package access

import (
	"context"
	"testing"
	"time"
)

func TestPolicyMode(t *testing.T) {
	p := NewPolicy(map[string]Rule{
		"ecr.test":   {Mode: NodeMode},
		"ghcr.test":  {Mode: NodeMode, Repositories: []string{"org/base-*", "platform/**"}},
		"quay.test":  {Mode: ClientMode},
		"empty.test": {},
	})
	tests := []struct {
		registry, repo string
		want           Mode
	}{
		{"ecr.test", "team/app", NodeMode},
		{"ecr.test", "a/b/c", NodeMode},
		{"ghcr.test", "org/base-debian", NodeMode},
		{"ghcr.test", "org/base-debian/slim", ClientMode}, // * stays in one segment
		{"ghcr.test", "org/app", ClientMode},
		{"ghcr.test", "platform/x", NodeMode},
		{"ghcr.test", "platform/x/y", NodeMode},
		{"ghcr.test", "platform", ClientMode},
		{"ghcr.test", "platformer/x", ClientMode},
		{"quay.test", "team/app", ClientMode},
		{"empty.test", "team/app", ClientMode},
		{"unlisted.test", "team/app", ClientMode},
	}
	for _, tt := range tests {
		if got := p.Mode(tt.registry, tt.repo); got != tt.want {
			t.Errorf("Mode(%s, %s) = %s, want %s", tt.registry, tt.repo, got, tt.want)
		}
		if got := p.Node(tt.registry, tt.repo); got != (tt.want == NodeMode) {
			t.Errorf("Node(%s, %s) = %v", tt.registry, tt.repo, got)
		}
	}
	for reg, want := range map[string]bool{"ecr.test": true, "ghcr.test": false, "quay.test": false, "unlisted.test": false} {
		if got := p.NodeRegistry(reg); got != want {
			t.Errorf("NodeRegistry(%s) = %v, want %v", reg, got, want)
		}
	}
	var none *Policy
	if none.Mode("ecr.test", "x") != ClientMode || none.Node("ecr.test", "x") || none.NodeRegistry("ecr.test") {
		t.Error("a nil policy is not client mode everywhere")
	}
}

// In node mode the node's credentials decide for every client of the
// repository, whatever it sends; other repositories and registries keep
// judging the client's own. Answers are remembered apart.
func TestCheckNodeMode(t *testing.T) {
	clientUp := &fakeUpstream{allowed: map[string]string{"Bearer good": "team/private"}}
	nodeUp := &fakeUpstream{allowed: map[string]string{"": "team/private"}} // the node's client adds its own
	c := New(Options{Upstream: clientUp, NodeUpstream: nodeUp, TTL: time.Hour,
		Policy: NewPolicy(map[string]Rule{"node.test": {Mode: NodeMode, Repositories: []string{"team/**"}}})})
	ctx := context.Background()
	tests := []struct {
		name, registry, repo, cred string
		ok                         bool
		asked                      *fakeUpstream
	}{
		{"anonymous, node mode", "node.test", "team/private", "", true, nodeUp},
		{"anonymous token, node mode: the node's answer, remembered", "node.test", "team/private", "Bearer anonymous", true, nil},
		{"node cannot read it", "node.test", "team/other", "", false, nodeUp},
		{"outside the patterns", "node.test", "other/private", "", false, clientUp},
		{"client mode registry, anonymous", "client.test", "team/private", "", false, clientUp},
		{"client mode registry, good token", "client.test", "team/private", "Bearer good", true, clientUp},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			nb, cb := nodeUp.calls, clientUp.calls
			err := c.Check(ctx, tt.registry, tt.repo, d, Blob, auth(tt.cred))
			if (err == nil) != tt.ok {
				t.Fatalf("Check = %v, want ok=%v", err, tt.ok)
			}
			total := nodeUp.calls - nb + clientUp.calls - cb
			if tt.asked == nil && total != 0 {
				t.Fatalf("asked the upstream %d times; want the remembered answer", total)
			}
			if asked := map[*fakeUpstream]int{nodeUp: nodeUp.calls - nb, clientUp: clientUp.calls - cb}; tt.asked != nil && (asked[tt.asked] != 1 || total != 1) {
				t.Fatalf("asked node %d, client %d times; want once, the %s upstream", nodeUp.calls-nb, clientUp.calls-cb, map[bool]string{true: "node's", false: "client's"}[tt.asked == nodeUp])
			}
		})
	}
	// The node's answer is remembered under the node, not under the
	// anonymous credential of a client-mode check.
	nb := nodeUp.calls
	if err := c.Check(ctx, "node.test", "team/private", d, Blob, auth("")); err != nil || nodeUp.calls != nb {
		t.Fatalf("second node-mode check: %v, %d more calls", err, nodeUp.calls-nb)
	}
	c.Allow("node.test", "team/allowed", d, Blob, auth("Bearer whatever"))
	if err := c.Check(ctx, "node.test", "team/allowed", d, Blob, auth("")); err != nil || nodeUp.calls != nb {
		t.Fatalf("after Allow in node mode: %v, %d more calls", err, nodeUp.calls-nb)
	}
}
