package peer

import (
	"context"
	"io"
	"sync"
	"testing"

	"github.com/opencontainers/go-digest"
	"google.golang.org/grpc"

	"github.com/registry-proxy/registry-proxy/p2p/pb"
	"github.com/registry-proxy/registry-proxy/piece"
)

// fakeSource holds a blob that completes while it is watched.
type fakeSource struct {
	mu      sync.Mutex
	snap    Snapshot
	changed chan struct{}
}

func (f *fakeSource) Snapshot(context.Context, digest.Digest) (Snapshot, <-chan struct{}, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	s := f.snap
	s.Done = append([]bool(nil), s.Done...)
	return s, f.changed, true
}

func (f *fakeSource) OpenPiece(context.Context, digest.Digest, int) (io.ReadSeeker, int64, int64, func(), error) {
	return nil, 0, 0, nil, ErrNoPiece
}

func (f *fakeSource) update(fn func(*Snapshot)) {
	f.mu.Lock()
	fn(&f.snap)
	close(f.changed)
	f.changed = make(chan struct{})
	f.mu.Unlock()
}

type fakeStream struct {
	grpc.ServerStream
	ctx  context.Context
	sent chan *pb.PieceUpdate
}

func (s *fakeStream) Context() context.Context     { return s.ctx }
func (s *fakeStream) Send(u *pb.PieceUpdate) error { s.sent <- u; return nil }

// The update that says complete carries every piece's checksum, also those
// sent before: a child takes it on its own.
func TestWatchPiecesCompleteCarriesEveryChecksum(t *testing.T) {
	plan := piece.PlanFor(3 * piece.MinSize)
	src := &fakeSource{changed: make(chan struct{}), snap: Snapshot{Plan: plan, Done: []bool{true, false, false}, CRC: []uint32{11, 0, 0}}}
	s := NewServer(Options{Source: src})
	st := &fakeStream{ctx: context.Background(), sent: make(chan *pb.PieceUpdate, 10)}
	d := digest.FromString("blob")
	errc := make(chan error, 1)
	go func() { errc <- s.WatchPieces(&pb.WatchPiecesRequest{Digest: d.String(), HostId: "child"}, st) }()
	if u := <-st.sent; len(u.GetPieces()) != 1 || u.GetComplete() {
		t.Fatalf("first update %v", u)
	}
	src.update(func(s *Snapshot) { s.Done = []bool{true, true, true}; s.CRC = []uint32{11, 22, 33}; s.Complete = true })
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	var last *pb.PieceUpdate
	for len(st.sent) > 0 {
		last = <-st.sent
	}
	if !last.GetComplete() || len(last.GetPieces()) != 3 {
		t.Fatalf("complete update with %d pieces: %v", len(last.GetPieces()), last)
	}
	for i, p := range last.GetPieces() {
		if want := []uint32{11, 22, 33}[i]; p.GetChecksum() != want {
			t.Errorf("piece %d checksum %d, want %d", p.GetIndex(), p.GetChecksum(), want)
		}
	}
}
