package sharing

import (
	"context"
	"errors"
	"io"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/p2p/peer"
)

// prober answers for the repositories it lists as public, and counts.
type prober struct {
	public map[string]bool
	asked  int
}

func (p *prober) PublicBlob(_ context.Context, _, repo string, _ digest.Digest) bool {
	p.asked++
	return p.public[repo]
}

func (p *prober) Public(_ context.Context, _, repo, _ string) bool {
	p.asked++
	return p.public[repo]
}

type holdings map[digest.Digest]int64

func (h holdings) Complete() map[digest.Digest]int64 {
	out := map[digest.Digest]int64{}
	for d, n := range h {
		out[d] = n
	}
	return out
}
func (h holdings) Changed() <-chan struct{} { return nil }

type source struct{}

func (source) Snapshot(context.Context, digest.Digest) (peer.Snapshot, <-chan struct{}, bool) {
	return peer.Snapshot{}, nil, true
}
func (source) OpenPiece(context.Context, digest.Digest, int) (io.ReadSeeker, int64, int64, func(), error) {
	return nil, 0, 1, func() {}, nil
}

func TestPolicy(t *testing.T) {
	pub, priv, unknown := digest.FromString("public"), digest.FromString("private"), digest.FromString("unknown")
	ctx := context.Background()
	if p := New(true, nil); !p.Shareable(priv) || p != nil {
		t.Fatal("share_private = true must share everything")
	}
	pr := &prober{public: map[string]bool{"library/app": true}}
	p := New(false, pr)
	if !p.LearnBlob(ctx, "reg.test", "library/app", pub) || p.LearnBlob(ctx, "reg.test", "team/private", priv) {
		t.Fatal("LearnBlob: public not shareable, or private shareable")
	}
	if !p.LearnManifest(ctx, "reg.test", "library/app", digest.FromString("m")) {
		t.Fatal("LearnManifest: a public manifest not shareable")
	}
	asked := pr.asked
	if !p.LearnBlob(ctx, "reg.test", "library/app", pub) || pr.asked != asked {
		t.Fatal("a digest known public was asked about again")
	}
	for d, want := range map[digest.Digest]bool{pub: true, priv: false, unknown: false} {
		if p.Shareable(d) != want {
			t.Errorf("Shareable(%s) = %v", d, !want)
		}
	}
	a := Announced{Holdings: holdings{pub: 1, priv: 2, unknown: 3}, Policy: p}
	if got := a.Complete(); len(got) != 1 || got[pub] != 1 {
		t.Errorf("announced %v, want only the public blob", got)
	}
	s := Source{Source: source{}, Policy: p}
	if _, _, ok := s.Snapshot(ctx, priv); ok {
		t.Error("a snapshot of a private blob")
	}
	if _, _, _, _, err := s.OpenPiece(ctx, priv, 0); !errors.Is(err, peer.ErrNoPiece) {
		t.Errorf("a piece of a private blob: %v", err)
	}
	if _, _, ok := s.Snapshot(ctx, pub); !ok {
		t.Error("no snapshot of a public blob")
	}
}
