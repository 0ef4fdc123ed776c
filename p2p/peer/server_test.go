package peer

import (
	"context"
	"errors"
	"io"
	"slices"
	"sync"
	"testing"

	"github.com/opencontainers/go-digest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/registry-proxy/registry-proxy/p2p/pb"
	"github.com/registry-proxy/registry-proxy/piece"
)

// fakeSource holds one blob as a log of done pieces, as a partial blob does.
type fakeSource struct {
	mu       sync.Mutex
	plan     piece.Plan
	log      []piece.Sum
	gen      uint32
	fetching []int
	complete bool
	gone     bool
	changed  chan struct{}
}

func newFakeSource(plan piece.Plan) *fakeSource {
	return &fakeSource{plan: plan, changed: make(chan struct{})}
}

func (f *fakeSource) Pieces(_ context.Context, _ digest.Digest, c piece.Cursor) (Holding, <-chan struct{}, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.gone {
		return Holding{}, nil, ErrNotHere
	}
	if c.Gen != 0 && c.Gen != f.gen+1 {
		return Holding{}, nil, errors.New("pieces reset")
	}
	done := f.log[c.N:]
	if f.complete {
		done = f.log
	}
	return Holding{Plan: f.plan, Done: done, Next: piece.Cursor{Gen: f.gen + 1, N: len(f.log)}, Fetching: f.fetching, Complete: f.complete}, f.changed, nil
}

func (f *fakeSource) OpenPiece(context.Context, digest.Digest, int) (io.ReadSeeker, int64, int64, func(), error) {
	return nil, 0, 0, nil, ErrNoPiece
}

func (f *fakeSource) update(fn func(*fakeSource)) {
	f.mu.Lock()
	fn(f)
	close(f.changed)
	f.changed = make(chan struct{})
	f.mu.Unlock()
}

func (f *fakeSource) done(i int, crc uint32) {
	f.update(func(f *fakeSource) { f.log = append(f.log, piece.Sum{Index: uint32(i), CRC: crc}) })
}

type fakeStream struct {
	grpc.ServerStream
	ctx  context.Context
	sent chan *pb.PieceUpdate
}

func (s *fakeStream) Context() context.Context     { return s.ctx }
func (s *fakeStream) Send(u *pb.PieceUpdate) error { s.sent <- u; return nil }

// watch runs WatchPieces on src until it returns (on errc).
func watch(t *testing.T, opts Options) (*fakeStream, <-chan error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	st := &fakeStream{ctx: ctx, sent: make(chan *pb.PieceUpdate, 100)}
	errc := make(chan error, 1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		errc <- NewServer(opts).WatchPieces(&pb.WatchPiecesRequest{Digest: digest.FromString("blob").String(), HostId: "child"}, st)
	}()
	t.Cleanup(func() { cancel(); <-done })
	return st, errc
}

func indexes(u *pb.PieceUpdate) (out []int) {
	for _, p := range u.GetPieces() {
		out = append(out, int(p.GetIndex()))
	}
	return out
}

// Each piece is sent once, in the order it was done; a new fetching list is
// sent on its own.
func TestWatchPiecesSendsEachPieceOnce(t *testing.T) {
	src := newFakeSource(piece.PlanFor(4 * piece.MinSize))
	src.done(2, 22)
	st, _ := watch(t, Options{Source: src})
	if u := <-st.sent; !slices.Equal(indexes(u), []int{2}) || u.GetPieces()[0].GetChecksum() != 22 || u.GetComplete() {
		t.Fatalf("first update %v, want piece 2 alone", u)
	}
	src.done(0, 11)
	if u := <-st.sent; !slices.Equal(indexes(u), []int{0}) {
		t.Fatalf("second update %v, want piece 0 alone", u)
	}
	src.update(func(f *fakeSource) { f.fetching = []int{3} })
	if u := <-st.sent; len(u.GetPieces()) != 0 || !slices.Equal(u.GetFetching(), []uint32{3}) {
		t.Fatalf("fetching update %v, want fetching [3] and no pieces", u)
	}
	src.done(1, 33)
	src.done(3, 44)
	var got []int
	for len(got) < 2 {
		u := <-st.sent
		got = append(got, indexes(u)...)
	}
	if !slices.Equal(got, []int{1, 3}) {
		t.Fatalf("later pieces %v, want [1 3]", got)
	}
}

// The update that says complete carries every piece's checksum, also those
// sent before: a child takes it on its own.
func TestWatchPiecesCompleteCarriesEveryChecksum(t *testing.T) {
	src := newFakeSource(piece.PlanFor(3 * piece.MinSize))
	src.done(0, 11)
	st, errc := watch(t, Options{Source: src})
	if u := <-st.sent; len(u.GetPieces()) != 1 || u.GetComplete() {
		t.Fatalf("first update %v", u)
	}
	src.update(func(f *fakeSource) {
		f.log = append(f.log, piece.Sum{Index: 1, CRC: 22}, piece.Sum{Index: 2, CRC: 33})
		f.complete = true
	})
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

// The watch ends with a status a child can tell apart: the blob not here
// at all, its download gone meanwhile, its pieces thrown away.
func TestWatchPiecesEnds(t *testing.T) {
	plan := piece.PlanFor(2 * piece.MinSize)
	for _, tc := range []struct {
		name   string
		before func(*fakeSource)
		during func(*fakeSource)
		want   codes.Code
	}{
		{name: "not here", before: func(f *fakeSource) { f.gone = true }, want: codes.NotFound},
		{name: "download gone", during: func(f *fakeSource) { f.gone = true }, want: codes.Unavailable},
		{name: "pieces reset", during: func(f *fakeSource) { f.gen++; f.log = nil }, want: codes.Aborted},
		{name: "plan changed", during: func(f *fakeSource) { f.plan = piece.PlanFor(5 * piece.MinSize) }, want: codes.Aborted},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src := newFakeSource(plan)
			src.done(0, 1)
			if tc.before != nil {
				tc.before(src)
			}
			st, errc := watch(t, Options{Source: src})
			if tc.during != nil {
				<-st.sent
				src.update(tc.during)
			}
			if err := <-errc; status.Code(err) != tc.want {
				t.Fatalf("WatchPieces = %v, want %v", err, tc.want)
			}
		})
	}
}

// A node built with the ClaimComplete fault claims every piece at once,
// with the checksums it knows (zero for the rest).
func TestWatchPiecesClaimComplete(t *testing.T) {
	src := newFakeSource(piece.PlanFor(3 * piece.MinSize))
	src.done(1, 22)
	st, errc := watch(t, Options{Source: src, Faults: Faults{ClaimComplete: true}})
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	u := <-st.sent
	if !u.GetComplete() || !slices.Equal(indexes(u), []int{0, 1, 2}) || u.GetPieces()[1].GetChecksum() != 22 || u.GetPieces()[0].GetChecksum() != 0 {
		t.Fatalf("claimed update %v, want complete with pieces 0-2, checksum 22 for piece 1", u)
	}
}
