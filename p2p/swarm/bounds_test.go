package swarm

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/registry-proxy/registry-proxy/blobstore"
	"github.com/registry-proxy/registry-proxy/p2p/membership"
	"github.com/registry-proxy/registry-proxy/p2p/owner"
	"github.com/registry-proxy/registry-proxy/p2p/pb"
	"github.com/registry-proxy/registry-proxy/proxy/upstream"
	"github.com/registry-proxy/registry-proxy/task"
)

// countingOwner is an Owner that counts its upstream requests (safe for
// concurrent use) and fails them with err.
type countingOwner struct {
	calls atomic.Int64
	err   error
}

func (o *countingOwner) OpenForPeers(context.Context, task.Request) (Owned, error) {
	o.calls.Add(1)
	if o.err != nil {
		return nil, o.err
	}
	return fakeOwned{n: 1}, nil
}

// bounded is a Server among n members ("node-0" .. at 127.0.1.i; self is
// node-0) on an injected clock, counting its refusals.
type bounded struct {
	*Server
	now     time.Time
	mu      sync.Mutex
	refused map[string]int
	owner   *countingOwner
	ids     []string
}

func newBounded(t testing.TB, n int, b Bounds, ownerErr error) *bounded {
	t.Helper()
	store, err := blobstore.Open(context.Background(), t.TempDir(), blobstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	up, err := upstream.New(upstream.Options{Registries: map[string]string{"reg.test": "http://127.0.0.1:9"}})
	if err != nil {
		t.Fatal(err)
	}
	var members staticMembers
	x := &bounded{now: time.Unix(1e6, 0), refused: map[string]int{}, owner: &countingOwner{err: ownerErr}}
	for i := range n {
		id := fmt.Sprint("node-", i)
		members = append(members, membership.Member{ID: id, Addr: memberIP(i) + ":7000"})
		x.ids = append(x.ids, id)
	}
	x.Server = NewServer(ServerOptions{
		Logger:  slog.New(slog.NewTextHandler(io.Discard, nil)),
		Members: members, Store: store, Registries: up, Owner: x.owner, Self: "node-0", Bounds: b,
		Now: func() time.Time { x.mu.Lock(); defer x.mu.Unlock(); return x.now },
		Refused: func(call, reason string) {
			x.mu.Lock()
			defer x.mu.Unlock()
			x.refused[call+"/"+reason]++
		},
	})
	return x
}

func memberIP(i int) string { return fmt.Sprintf("127.0.%d.%d", 1+i/250, 1+i%250) }

func (x *bounded) advance(d time.Duration) { x.mu.Lock(); x.now = x.now.Add(d); x.mu.Unlock() }

func (x *bounded) register(member int, d string) (*pb.RegisterResponse, error) {
	return x.Register(from(memberIP(member)), &pb.RegisterRequest{Digest: d, HostId: fmt.Sprint("node-", member), Registry: "reg.test", Repository: "team/app"})
}

func (x *bounded) rank(d string) int {
	for i, id := range owner.Rank(d, x.ids) {
		if id == "node-0" {
			return i
		}
	}
	return -1
}

func randomDigest(r *rand.Rand) string {
	var b [32]byte
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return digest.NewDigestFromBytes(digest.SHA256, b[:]).String()
}

// Only a digest's first three in rank record a registration; the others
// refuse it with FailedPrecondition and record nothing.
func TestRegisterOnlyOwners(t *testing.T) {
	x := newBounded(t, 20, Bounds{}, nil)
	r := rand.New(rand.NewPCG(1, 2))
	accepted := 0
	for range 300 {
		d := randomDigest(r)
		_, err := x.register(1+r.IntN(19), d)
		owns := x.rank(d) <= maxOwnerRank
		switch {
		case owns && err != nil:
			t.Fatalf("rank %d: %v", x.rank(d), err)
		case !owns && status.Code(err) != codes.FailedPrecondition:
			t.Fatalf("rank %d: %v, want FailedPrecondition", x.rank(d), err)
		case !owns && len(x.opts.Tracker.Peers(d, "", 10)) != 0:
			t.Fatalf("rank %d: recorded", x.rank(d))
		}
		if owns {
			accepted++
		}
	}
	if accepted == 0 || accepted > 100 || x.opts.Tracker.Registered() != accepted {
		t.Errorf("%d accepted of 300 (about 3/20 expected), %d recorded", accepted, x.opts.Tracker.Registered())
	}
	if int(x.owner.calls.Load()) != accepted {
		t.Errorf("owner asked %d times for %d accepted", x.owner.calls.Load(), accepted)
	}
	if x.refused["register/not_owner"] != 300-accepted {
		t.Errorf("refusals counted: %v", x.refused)
	}
}

// A member flooding registrations for random digests (that the registry
// does not have) gets NewBurst accepted then NewRate a second, the owner
// asks the upstream FailBurst times then once each 10 s, and other members
// are not held back.
func TestRegisterFlood(t *testing.T) {
	x := newBounded(t, 3, Bounds{}, &upstream.StatusError{Code: http.StatusNotFound})
	r := rand.New(rand.NewPCG(3, 4))
	count := func(member, n int) (ok, exhausted int) {
		for range n {
			_, err := x.register(member, randomDigest(r))
			switch status.Code(err) {
			case codes.OK:
				ok++
			case codes.ResourceExhausted:
				exhausted++
			default:
				t.Fatalf("Register: %v", err)
			}
		}
		return ok, exhausted
	}
	ok, exhausted := count(1, 20000)
	b := DefaultBounds
	t.Logf("flood: %d accepted, %d refused, %d upstream requests, refusals %v", ok, exhausted, x.owner.calls.Load(), x.refused)
	if int64(b.FailBurst) != x.owner.calls.Load() || ok != b.FailBurst {
		t.Errorf("%d upstream requests, %d accepted; want %d (FailBurst)", x.owner.calls.Load(), ok, b.FailBurst)
	}
	// The flood spent the calls: its own budget, not another member's.
	if ok2, _ := count(2, 4); ok2 != 4 {
		t.Errorf("another member: %d of 4 accepted", ok2)
	}
	x.advance(10 * time.Second)
	if ok, _ := count(1, 100); ok != 1 {
		t.Errorf("10 s later: %d accepted, want 1 (one failure allowed)", ok)
	}
	// With the registry answering: NewBurst at once, NewRate a second, and
	// the registrations the tracker holds bounded.
	y := newBounded(t, 3, Bounds{StartBurst: 1 << 20, StartRate: 1 << 20}, nil)
	x = y
	ok, _ = count(1, 1000)
	if ok != b.NewBurst {
		t.Errorf("%d new registrations accepted at once, want NewBurst %d", ok, b.NewBurst)
	}
	x.advance(time.Second)
	if ok, _ = count(1, 1000); ok != int(b.NewRate) {
		t.Errorf("%d accepted a second later, want NewRate %v", ok, b.NewRate)
	}
	if n := x.opts.Tracker.Registered(); n != b.NewBurst+int(b.NewRate) {
		t.Errorf("%d registrations held", n)
	}
	// All expire after RegTTL.
	x.advance(b.RegTTL + 2*time.Minute)
	x.opts.Tracker.Expire()
	if n := x.opts.Tracker.Registered(); n != 0 {
		t.Errorf("%d registrations held past RegTTL", n)
	}
}

// Calls per member and registrations per member and in all are capped;
// refreshes of a registration are not new ones.
func TestRegisterCaps(t *testing.T) {
	x := newBounded(t, 3, Bounds{CallRate: 10, CallBurst: 20, NewBurst: 1000, RegPerMember: 5, RegTotal: 8}, nil)
	r := rand.New(rand.NewPCG(5, 6))
	var held []string
	for range 6 {
		d := randomDigest(r)
		_, err := x.register(1, d)
		if len(held) < 5 {
			if err != nil {
				t.Fatal(err)
			}
			held = append(held, d)
		} else if status.Code(err) != codes.ResourceExhausted {
			t.Fatalf("6th registration of a member: %v", err)
		}
	}
	for _, d := range held[:3] { // refreshes at the cap
		if _, err := x.register(1, d); err != nil {
			t.Fatalf("refresh: %v", err)
		}
	}
	for i := range 4 {
		_, err := x.register(2, randomDigest(r))
		if (err == nil) != (i < 3) {
			t.Fatalf("member 2's registration %d with 5+%d held of 8: %v", i, i, err)
		}
	}
	// 6 + 3 + 4 calls of member 1 and 2 so far; member 1 has 11 of 20 left.
	n := 0
	for range 30 {
		if _, err := x.register(1, held[0]); err == nil {
			n++
		}
	}
	if n != 11 {
		t.Errorf("%d calls accepted of the 11 left in the burst", n)
	}
	x.advance(time.Second)
	if _, err := x.register(1, held[0]); err != nil {
		t.Errorf("a second later: %v", err)
	}
	if x.refused["register/full"] != 2 || x.refused["register/rate"] != 19 {
		t.Errorf("refusals counted: %v", x.refused)
	}
}

// A second registration for a digest whose owner download just failed
// (or is private) does not ask the upstream again, whoever asks.
func TestRegisterDedupesUpstream(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		code codes.Code
	}{
		{"failed", &upstream.StatusError{Code: http.StatusBadGateway}, codes.Unavailable},
		{"private", &upstream.StatusError{Code: http.StatusUnauthorized}, codes.OK},
	} {
		t.Run(tc.name, func(t *testing.T) {
			x := newBounded(t, 3, Bounds{}, tc.err)
			for m := 1; m < 3; m++ {
				for range 5 {
					if _, err := x.register(m, testDigest); status.Code(err) != tc.code {
						t.Fatalf("Register: %v, want %v", err, tc.code)
					}
				}
			}
			if n := x.owner.calls.Load(); n != 1 {
				t.Errorf("upstream asked %d times", n)
			}
		})
	}
}

// Announce keeps the blobs this node ranks for, drops the others, refuses
// more than HeldPerMember, and forgets announcements after HeldTTL.
func TestAnnounceBounded(t *testing.T) {
	x := newBounded(t, 20, Bounds{HeldPerMember: 500}, nil)
	r := rand.New(rand.NewPCG(7, 8))
	announce := func(member, n int) (int, error) {
		req := &pb.AnnounceRequest{HostId: fmt.Sprint("node-", member)}
		for range n {
			req.Blobs = append(req.Blobs, &pb.HeldBlob{Digest: randomDigest(r), Size: 1})
		}
		want := 0
		for _, b := range req.Blobs {
			if x.rank(b.Digest) <= maxOwnerRank {
				want++
			}
		}
		before := x.opts.Tracker.Held()
		_, err := x.Announce(from(memberIP(member)), req)
		if err == nil && before == 0 && x.opts.Tracker.Held() != want {
			t.Errorf("%d of %d blobs recorded, %d ranked for", x.opts.Tracker.Held(), n, want)
		}
		return want, err
	}
	if _, err := announce(1, 400); err != nil {
		t.Fatal(err)
	}
	held := x.opts.Tracker.Held()
	if _, err := announce(1, 501); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("501 blobs: %v", err)
	}
	if x.opts.Tracker.Held() != held {
		t.Error("a refused announcement changed the holdings")
	}
	x.advance(DefaultBounds.HeldTTL + 2*time.Minute)
	want, err := announce(2, 50) // a write past sweepEvery sweeps
	if err != nil {
		t.Fatal(err)
	}
	if x.opts.Tracker.Held() != want {
		t.Errorf("%d holdings after HeldTTL, want member 2's %d", x.opts.Tracker.Held(), want)
	}
	if x.refused["announce/not_owner"] == 0 || x.refused["announce/full"] != 1 {
		t.Errorf("refusals counted: %v", x.refused)
	}
}

// Many members flooding at once: each gets its own budget, the totals
// hold, the upstream is asked at most FailBurst times per member.
func TestRegisterFloodManyMembers(t *testing.T) {
	const members = 40
	x := newBounded(t, members+1, Bounds{RegTotal: 3000}, &upstream.StatusError{Code: http.StatusNotFound})
	var wg sync.WaitGroup
	var accepted atomic.Int64
	for m := 1; m <= members; m++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(m), 9))
			for range 500 {
				if _, err := x.register(m, randomDigest(r)); err == nil {
					accepted.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	if n := x.owner.calls.Load(); n > members*int64(DefaultBounds.FailBurst) {
		t.Errorf("upstream asked %d times by %d members", n, members)
	}
	if n := x.opts.Tracker.Registered(); n > 3000 || int64(n) != accepted.Load() {
		t.Errorf("%d registrations held, %d accepted, cap 3000", n, accepted.Load())
	}
}

// Any announcement from any address: refused, or only the digests this
// node ranks for recorded, within the caps.
func FuzzAnnounce(f *testing.F) {
	x := newBounded(f, 10, Bounds{HeldPerMember: 64, HeldTotal: 128, CallBurst: 1 << 30}, nil)
	f.Add(testDigest, 3, uint8(1), uint8(1), int64(5))
	f.Add("sha256:", 0, uint8(2), uint8(3), int64(-1))
	f.Fuzz(func(t *testing.T, first string, n int, member, ip uint8, size int64) {
		req := &pb.AnnounceRequest{HostId: fmt.Sprint("node-", member%12), Blobs: []*pb.HeldBlob{{Digest: first, Size: size}}}
		r := rand.New(rand.NewPCG(uint64(n), uint64(member)))
		for range min(max(n, 0), 200) {
			req.Blobs = append(req.Blobs, &pb.HeldBlob{Digest: randomDigest(r), Size: 1})
		}
		_, err := x.Announce(from(memberIP(int(ip%12))), req)
		if err != nil {
			return
		}
		if member%12 != ip%12 || member%12 >= 10 {
			t.Fatalf("accepted node-%d from %s", member%12, memberIP(int(ip%12)))
		}
		if x.opts.Tracker.Held() > 128 {
			t.Fatalf("%d held, cap 128", x.opts.Tracker.Held())
		}
		for _, b := range req.Blobs {
			if x.rank(b.Digest) > maxOwnerRank && len(x.opts.Tracker.Holders(b.Digest)) > 0 {
				t.Fatalf("%s recorded at rank %d", b.Digest, x.rank(b.Digest))
			}
		}
	})
}
