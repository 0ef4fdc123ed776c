package transfer

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/internal/conntest"
	"github.com/registry-proxy/registry-proxy/p2p/collector"
	"github.com/registry-proxy/registry-proxy/p2p/hoststate"
	"github.com/registry-proxy/registry-proxy/p2p/peer"
	"github.com/registry-proxy/registry-proxy/p2p/seeding"
	"github.com/registry-proxy/registry-proxy/piece"
)

// TestFetch maps each answer of a peer's piece endpoint, and keeps the
// connection after a refusal: a closed one would cost the next piece a new
// connection (a TLS handshake between nodes).
func TestFetch(t *testing.T) {
	srv := conntest.New(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case strings.HasSuffix(r.URL.Path, "/0"):
			_, _ = io.WriteString(w, "abcd")
		case strings.HasSuffix(r.URL.Path, "/1"):
			http.Error(w, "upload slots full", http.StatusServiceUnavailable)
		case strings.HasSuffix(r.URL.Path, "/2"):
			http.Error(w, "sent elsewhere", http.StatusConflict)
		case strings.HasSuffix(r.URL.Path, "/3"):
			http.Error(w, "no such piece", http.StatusNotFound)
		case strings.HasSuffix(r.URL.Path, "/4"):
			_, _ = io.WriteString(w, "abc")
		}
	}))
	defer srv.Close()
	p := NewPool(Options{})
	defer p.Close()
	parent := p.Parent("node-b", strings.TrimPrefix(srv.URL, "http://"), digest.FromString("blob"))
	for _, tc := range []struct {
		piece   int
		want    error
		wantErr string
	}{
		{1, collector.ErrBusy, ""},
		{2, collector.ErrElsewhere, ""},
		{3, nil, "404 Not Found"},
		{0, nil, ""},
		{4, nil, "3 bytes, want 4"},
	} {
		body, err := parent.Fetch(t.Context(), tc.piece, 0, 4)
		switch {
		case tc.want != nil && !errors.Is(err, tc.want):
			t.Errorf("piece %d: %v, want %v", tc.piece, err, tc.want)
		case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
			t.Errorf("piece %d: %v, want %q", tc.piece, err, tc.wantErr)
		case tc.want == nil && tc.wantErr == "":
			if err != nil {
				t.Fatalf("piece %d: %v", tc.piece, err)
			}
			b, err := io.ReadAll(body)
			body.Close()
			if err != nil || string(b) != "abcd" {
				t.Errorf("piece %d: %q, %v", tc.piece, b, err)
			}
		}
	}
	// One connection for the refusals and the piece; the short piece is
	// not read and closes its own.
	if n := srv.Conns(); n != 1 {
		t.Errorf("%d connections for one piece after three refusals, want 1", n)
	}
}

// memSource holds one blob whole, in memory; reading: it says it still
// reads the blob from the upstream (super-seeding's stricter case).
type memSource struct {
	plan    piece.Plan
	data    []byte
	reading bool
}

func (m memSource) Snapshot(context.Context, digest.Digest) (peer.Snapshot, <-chan struct{}, bool) {
	done := make([]bool, m.plan.Count())
	for i := range done {
		done[i] = true
	}
	return peer.Snapshot{Plan: m.plan, Done: done, CRC: make([]uint32, len(done)), Complete: !m.reading, Seeding: m.reading}, nil, true
}

func (m memSource) OpenPiece(_ context.Context, _ digest.Digest, i int) (io.ReadSeeker, int64, int64, func(), error) {
	off, n := m.plan.Range(i)
	return bytes.NewReader(m.data), off, n, func() {}, nil
}

// TestRefusalOffersFreshPieces: a busy peer server that refuses a duplicate
// names, in its 409, the pieces it would send instead, and the pool hands
// them to the collector as piece.EncodeSet wrote them. Busy is the ledger's
// default: two uploads while the node reads from the upstream, four for a
// relay.
func TestRefusalOffersFreshPieces(t *testing.T) {
	for _, tc := range []struct {
		name    string
		reading bool
		uploads int
		refused bool
	}{
		{"reading from the upstream", true, 2, true},
		{"relay", false, 4, true},
		{"relay below its limit", false, 2, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			testRefusal(t, tc.reading, tc.uploads, tc.refused)
		})
	}
}

func testRefusal(t *testing.T, reading bool, uploads int, refused bool) {
	plan := piece.PlanFor(4 * piece.MinSize)
	src := memSource{plan: plan, data: make([]byte, plan.Size), reading: reading}
	meter := hoststate.New(hoststate.Options{}) // not sampled: no counters read
	for range uploads {
		release, err := meter.BeginUpload()
		if err != nil {
			t.Fatal(err)
		}
		defer release()
	}
	srv := peer.NewServer(peer.Options{Source: src, Meter: meter, Ledger: seeding.New(seeding.Options{})})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	defer func() {
		srv.Close()
		if err := <-served; err != nil {
			t.Error(err)
		}
	}()
	p := NewPool(Options{})
	defer p.Close()
	parent := p.Parent("node-b", ln.Addr().String(), digest.FromString("blob"))
	off, n := plan.Range(1)
	body, err := parent.Fetch(t.Context(), 1, off, n)
	if err != nil {
		t.Fatalf("first copy of piece 1: %v", err)
	}
	if _, err := io.Copy(io.Discard, body); err != nil {
		t.Fatal(err)
	}
	body.Close()
	body, err = parent.Fetch(t.Context(), 1, off, n)
	if !refused {
		if err != nil {
			t.Fatalf("second copy of piece 1 from a relay below its limit: %v", err)
		}
		body.Close()
		return
	}
	var ee *collector.ElsewhereError
	if !errors.As(err, &ee) || !errors.Is(err, collector.ErrElsewhere) {
		t.Fatalf("second copy of piece 1 while busy: %v, want an ElsewhereError", err)
	}
	got, err := piece.DecodeSet(ee.Offered, plan.Count())
	if want := []bool{true, false, true, true}; err != nil || !slices.Equal(got, want) {
		t.Fatalf("offered %q = %v, %v; want %v", ee.Offered, got, err, want)
	}
}
