package statesync

import (
	"context"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"

	"github.com/registry-proxy/registry-proxy/internal/fakeclock"
	"github.com/registry-proxy/registry-proxy/p2p/pb"
)

// parent is one SyncHost server on an in-memory listener.
type parent struct {
	id  string
	srv *Server
	gs  *grpc.Server
	lis *bufconn.Listener
	tx  atomic.Uint64
}

func startParent(t *testing.T, id string, capacity int) *parent {
	t.Helper()
	p := &parent{id: id, lis: bufconn.Listen(1 << 20), gs: grpc.NewServer()}
	p.srv = NewServer(ServerOptions{
		Self: func() *pb.Host {
			return &pb.Host{Id: id, Addr: id, State: &pb.HostState{TxBandwidth: p.tx.Load()}}
		},
		Interval: 10 * time.Millisecond,
		Capacity: capacity,
	})
	pb.RegisterHostSyncServer(p.gs, p.srv)
	go p.gs.Serve(p.lis)
	t.Cleanup(p.gs.Stop)
	return p
}

func (p *parent) client(t *testing.T) pb.HostSyncClient {
	t.Helper()
	cc, err := grpc.NewClient("passthrough:///"+p.id,
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return p.lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return pb.NewHostSyncClient(cc)
}

func TestServerStreamsEachInterval(t *testing.T) {
	p := startParent(t, "p1", 10)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := p.client(t).SyncHost(ctx, &pb.SyncHostRequest{HostId: "c1", PeerId: "p1"})
	if err != nil {
		t.Fatal(err)
	}
	for want := uint64(0); want < 3; want++ {
		p.tx.Store(want)
		// States keep coming; the latest value shows up within a few sends.
		for {
			h, err := st.Recv()
			if err != nil {
				t.Fatal(err)
			}
			if h.GetState().GetTxBandwidth() == want {
				break
			}
		}
	}
}

func TestServerValidates(t *testing.T) {
	p := startParent(t, "p1", 10)
	tests := []struct {
		req  *pb.SyncHostRequest
		code codes.Code
	}{
		{&pb.SyncHostRequest{}, codes.InvalidArgument},
		{&pb.SyncHostRequest{HostId: "c", PeerId: "someone-else"}, codes.FailedPrecondition},
	}
	for _, tt := range tests {
		st, err := p.client(t).SyncHost(context.Background(), tt.req)
		if err == nil {
			_, err = st.Recv()
		}
		if status.Code(err) != tt.code {
			t.Errorf("%v: %v, want %v", tt.req, err, tt.code)
		}
	}
}

func TestServerEvictsLeastRecentSubscriber(t *testing.T) {
	p := startParent(t, "p1", 2)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c := p.client(t)
	var streams []pb.HostSync_SyncHostClient
	for _, id := range []string{"c1", "c2", "c3"} {
		st, err := c.SyncHost(ctx, &pb.SyncHostRequest{HostId: id})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := st.Recv(); err != nil { // subscribed
			t.Fatal(err)
		}
		streams = append(streams, st)
	}
	// c1 was evicted when c3 came.
	for {
		_, err := streams[0].Recv()
		if err != nil {
			if status.Code(err) != codes.ResourceExhausted {
				t.Fatalf("c1 ended with %v, want ResourceExhausted", err)
			}
			break
		}
	}
	for _, st := range streams[1:] {
		if _, err := st.Recv(); err != nil {
			t.Fatalf("c2/c3 closed: %v", err)
		}
	}
	if n := p.srv.Subscribers(); n != 2 {
		t.Fatalf("%d subscribers, want 2", n)
	}
}

func newSyncer(t *testing.T, clk *fakeclock.Clock, capacity int, parents map[string]*parent) *Syncer {
	clients := map[string]pb.HostSyncClient{}
	for id, p := range parents {
		clients[id] = p.client(t)
	}
	s := NewSyncer(SyncerOptions{
		HostID:   "child",
		Interval: 10 * time.Millisecond,
		Capacity: capacity,
		Now:      clk.Now,
		Dial: func(_ context.Context, addr string) (pb.HostSyncClient, func(), error) {
			return clients[addr], func() {}, nil
		},
	})
	t.Cleanup(s.Close)
	return s
}

func eventually(t *testing.T, what string, f func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !f() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestSyncerFollowsAndAges(t *testing.T) {
	p := startParent(t, "p1", 10)
	p.tx.Store(42)
	clk := fakeclock.New(time.Unix(1000, 0))
	s := newSyncer(t, clk, 10, map[string]*parent{"p1": p})
	if _, _, ok := s.State("p1"); ok {
		t.Fatal("state of a parent not followed")
	}
	s.Follow("p1", "p1")
	eventually(t, "first state", func() bool {
		st, _, ok := s.State("p1")
		return ok && st.GetTxBandwidth() == 42
	})
	// Parent gone: once the last state is older than three intervals it is unknown.
	p.gs.Stop()
	time.Sleep(30 * time.Millisecond) // let the stream end so no fresh state lands
	clk.Add(31 * time.Millisecond)
	if _, age, ok := s.State("p1"); ok {
		t.Fatalf("stale state (age %v) still reported", age)
	}
}

func TestSyncerReconnects(t *testing.T) {
	p := startParent(t, "p1", 10)
	clk := fakeclock.New(time.Unix(1000, 0))
	s := newSyncer(t, clk, 10, map[string]*parent{"p1": p})
	s.Follow("p1", "p1")
	eventually(t, "state", func() bool { _, _, ok := s.State("p1"); return ok })
	// The parent drops the stream (a replacing subscription); the syncer comes back.
	p.srv.mu.Lock()
	sub, _ := p.srv.subs.Peek("child")
	p.srv.mu.Unlock()
	sub.close(status.Error(codes.Unavailable, "test drop"))
	p.tx.Store(7)
	eventually(t, "state after reconnect", func() bool {
		st, _, ok := s.State("p1")
		return ok && st.GetTxBandwidth() == 7 && p.srv.Subscribers() == 1
	})
}

func TestSyncerCapacity(t *testing.T) {
	parents := map[string]*parent{}
	for _, id := range []string{"a", "b", "c"} {
		parents[id] = startParent(t, id, 10)
	}
	clk := fakeclock.New(time.Unix(1000, 0))
	s := newSyncer(t, clk, 2, parents)
	s.Follow("a", "a")
	s.Follow("b", "b")
	s.Follow("a", "a") // a used again: b is now least recent
	s.Follow("c", "c")
	if s.Following() != 2 {
		t.Fatalf("following %d", s.Following())
	}
	eventually(t, "a and c followed, b dropped", func() bool {
		_, _, okA := s.State("a")
		_, _, okB := s.State("b")
		_, _, okC := s.State("c")
		return okA && !okB && okC && parents["b"].srv.Subscribers() == 0
	})
}
