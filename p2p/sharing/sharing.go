// Package sharing decides which content may leave this node for its peers.
// By default (p2p.share_private = true) everything the node holds is
// shared with members, private content included. With share_private =
// false, only content the registry serves with no credentials at all is:
// a private blob or manifest is neither announced, nor sent, nor fetched for
// a peer, and every node fetches it with its own client's credentials.
package sharing

import (
	"context"
	"io"

	lru "github.com/hashicorp/golang-lru/v2"
	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/p2p/peer"
)

// Prober asks the registry, with no credentials, whether a repository's
// blob or manifest is readable; *access.Checker is one (it remembers the
// answer per repository).
type Prober interface {
	PublicBlob(ctx context.Context, registry, repo string, d digest.Digest) bool
	Public(ctx context.Context, registry, repo, ref string) bool
}

// Policy is the rule. A nil *Policy shares everything.
type Policy struct {
	prober Prober
	public *lru.Cache[digest.Digest, struct{}]
}

// maxKnown bounds the digests known public; past it the least recently
// seen are asked about again.
const maxKnown = 65536

// New returns the policy for p2p.share_private = sharePrivate; nil when
// everything is shared.
func New(sharePrivate bool, prober Prober) *Policy {
	if sharePrivate {
		return nil
	}
	public, _ := lru.New[digest.Digest, struct{}](maxKnown)
	return &Policy{prober: prober, public: public}
}

// Shareable reports whether d may go to peers: everything when private
// content is shared, else only what is known public.
func (p *Policy) Shareable(d digest.Digest) bool {
	return p == nil || p.public.Contains(d)
}

// LearnBlob finds out whether blob d of repo is public, and remembers it.
func (p *Policy) LearnBlob(ctx context.Context, registry, repo string, d digest.Digest) bool {
	if p.Shareable(d) {
		return true
	}
	if p.prober.PublicBlob(ctx, registry, repo, d) {
		p.public.Add(d, struct{}{})
		return true
	}
	return false
}

// LearnManifest finds out whether manifest d of repo is public, and
// remembers it.
func (p *Policy) LearnManifest(ctx context.Context, registry, repo string, d digest.Digest) bool {
	if p.Shareable(d) {
		return true
	}
	if p.prober.Public(ctx, registry, repo, d.String()) {
		p.public.Add(d, struct{}{})
		return true
	}
	return false
}

// Holdings are what the announcer announces (swarm.Holdings).
type Holdings interface {
	Complete() map[digest.Digest]int64
	Changed() <-chan struct{}
}

// Announced is h less what may not go to peers.
type Announced struct {
	Holdings
	Policy *Policy
}

// Complete implements Holdings.
func (a Announced) Complete() map[digest.Digest]int64 {
	all := a.Holdings.Complete()
	if a.Policy == nil {
		return all
	}
	for d := range all {
		if !a.Policy.Shareable(d) {
			delete(all, d)
		}
	}
	return all
}

// Source is a peer.Source that has nothing of what may not go to peers.
type Source struct {
	peer.Source
	Policy *Policy
}

// Snapshot implements peer.Source.
func (s Source) Snapshot(ctx context.Context, d digest.Digest) (peer.Snapshot, <-chan struct{}, bool) {
	if !s.Policy.Shareable(d) {
		return peer.Snapshot{}, nil, false
	}
	return s.Source.Snapshot(ctx, d)
}

// OpenPiece implements peer.Source.
func (s Source) OpenPiece(ctx context.Context, d digest.Digest, i int) (io.ReadSeeker, int64, int64, func(), error) {
	if !s.Policy.Shareable(d) {
		return nil, 0, 0, nil, peer.ErrNoPiece
	}
	return s.Source.OpenPiece(ctx, d, i)
}
