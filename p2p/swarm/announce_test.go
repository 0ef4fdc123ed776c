package swarm

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/opencontainers/go-digest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/registry-proxy/registry-proxy/p2p/owner"
	"github.com/registry-proxy/registry-proxy/p2p/pb"
)

type fakeHoldings struct {
	mu      sync.Mutex
	blobs   map[digest.Digest]int64
	changed chan struct{}
}

func (h *fakeHoldings) Complete() map[digest.Digest]int64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := map[digest.Digest]int64{}
	for d, n := range h.blobs {
		out[d] = n
	}
	return out
}

func (h *fakeHoldings) Changed() <-chan struct{} {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.changed
}

func (h *fakeHoldings) set(blobs map[digest.Digest]int64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.blobs = blobs
	close(h.changed)
	h.changed = make(chan struct{})
}

// fakeAnnouncing records the last announcement each address got, and
// fails for the addresses in down.
type fakeAnnouncing struct {
	mu    sync.Mutex
	got   map[string][]string
	calls map[string]int
	down  map[string]bool
}

func (f *fakeAnnouncing) Announce(_ context.Context, addr string, req *pb.AnnounceRequest) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls[addr]++
	if f.down[addr] {
		return errors.New("unreachable")
	}
	var ds []string
	for _, b := range req.GetBlobs() {
		ds = append(ds, b.GetDigest())
	}
	f.got[addr] = ds
	return nil
}

func (f *fakeAnnouncing) snapshot() (map[string][]string, map[string]int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	got, calls := map[string][]string{}, map[string]int{}
	for k, v := range f.got {
		got[k] = slices.Clone(v)
	}
	for k, v := range f.calls {
		calls[k] = v
	}
	return got, calls
}

// Each owner is told exactly the digests it owns that this node holds,
// again only when that set changes; an owner that could not be reached is
// told at the next poll; an emptied set is withdrawn.
func TestAnnouncer(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		members := staticMembers{{ID: "a", Addr: "A"}, {ID: "b", Addr: "B"}, {ID: "c", Addr: "C"}}
		ids := []string{"a", "b", "c"}
		blobs := map[digest.Digest]int64{}
		for i := range 30 {
			blobs[digest.FromString(fmt.Sprint("blob", i))] = int64(i + 1)
		}
		want := func(blobs map[digest.Digest]int64) map[string][]string {
			w := map[string][]string{}
			for d := range blobs {
				if o := owner.Rank(d.String(), ids)[0]; o != "a" {
					addr := map[string]string{"b": "B", "c": "C"}[o]
					w[addr] = append(w[addr], d.String())
				}
			}
			for _, v := range w {
				slices.Sort(v)
			}
			return w
		}
		h := &fakeHoldings{blobs: blobs, changed: make(chan struct{})}
		tr := &fakeAnnouncing{got: map[string][]string{}, calls: map[string]int{}, down: map[string]bool{"C": true}}
		a := NewAnnouncer(AnnouncerOptions{Self: "a", Members: members, Holdings: h, Transport: tr, Poll: 5 * time.Second})
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() {
			defer close(done)
			a.Run(ctx)
		}()
		synctest.Wait()
		got, calls := tr.snapshot()
		if w := want(blobs); fmt.Sprint(got["B"]) != fmt.Sprint(w["B"]) || calls["C"] != 1 || got["C"] != nil {
			t.Fatalf("first announcement: got %v (calls %v), want B %v and C failing", got, calls, w["B"])
		}
		tr.mu.Lock()
		tr.down = nil
		tr.mu.Unlock()
		time.Sleep(5 * time.Second) // the next poll
		synctest.Wait()
		got, calls = tr.snapshot()
		if w := want(blobs); fmt.Sprint(got["C"]) != fmt.Sprint(w["C"]) || calls["B"] != 1 {
			t.Fatalf("after the poll: got %v (calls %v), want C %v and B not told again", got, calls, w["C"])
		}

		// Only c's digests change: only c is told.
		fewer := map[digest.Digest]int64{}
		for d, n := range blobs {
			if owner.Rank(d.String(), ids)[0] != "c" {
				fewer[d] = n
			}
		}
		h.set(fewer)
		time.Sleep(2 * time.Second) // Settle
		synctest.Wait()
		got, calls = tr.snapshot()
		if len(got["C"]) != 0 || calls["C"] != 3 || calls["B"] != 1 {
			t.Fatalf("after c's blobs went: got %v, calls %v; want c told of none, b not told again", got, calls)
		}
		cancel()
		<-done
	})
}

// Announce records a member's holdings under its authenticated id and
// gossip address, and refuses what Register refuses.
func TestAnnounceValidates(t *testing.T) {
	tests := []struct {
		name  string
		ip    string
		req   *pb.AnnounceRequest
		code  codes.Code
		holds int
	}{
		{"valid", "127.0.0.2", &pb.AnnounceRequest{HostId: "child", Blobs: []*pb.HeldBlob{{Digest: testDigest, Size: 3}}}, codes.OK, 1},
		{"withdrawn", "127.0.0.2", &pb.AnnounceRequest{HostId: "child"}, codes.OK, 0},
		{"not a member", "127.0.0.2", &pb.AnnounceRequest{HostId: "intruder", Blobs: []*pb.HeldBlob{{Digest: testDigest, Size: 3}}}, codes.PermissionDenied, 0},
		{"member from another address", "127.0.0.9", &pb.AnnounceRequest{HostId: "child", Blobs: []*pb.HeldBlob{{Digest: testDigest, Size: 3}}}, codes.PermissionDenied, 0},
		{"bad digest", "127.0.0.2", &pb.AnnounceRequest{HostId: "child", Blobs: []*pb.HeldBlob{{Digest: "sha256:zz", Size: 3}}}, codes.InvalidArgument, 0},
		{"negative size", "127.0.0.2", &pb.AnnounceRequest{HostId: "child", Blobs: []*pb.HeldBlob{{Digest: testDigest, Size: -1}}}, codes.InvalidArgument, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newRegisterSwarm(t)
			_, err := s.Announce(from(tt.ip), tt.req)
			if got := status.Code(err); got != tt.code {
				t.Fatalf("code %v (%v), want %v", got, err, tt.code)
			}
			if got := len(s.opts.Tracker.Holders(testDigest)); got != tt.holds {
				t.Fatalf("%d holders recorded, want %d", got, tt.holds)
			}
			if tt.holds > 0 {
				if p := s.opts.Tracker.Peers(testDigest, "", 5); len(p) != 1 || p[0].Addr != "127.0.0.2:7000" {
					t.Fatalf("holder recorded as %v, want child at its gossip address", p)
				}
			}
		})
	}
}
