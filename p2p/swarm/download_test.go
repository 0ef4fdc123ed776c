package swarm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/p2p/collector"
	"github.com/registry-proxy/registry-proxy/p2p/membership"
	"github.com/registry-proxy/registry-proxy/p2p/owner"
	"github.com/registry-proxy/registry-proxy/p2p/pb"
	"github.com/registry-proxy/registry-proxy/piece"
	"github.com/registry-proxy/registry-proxy/task"
)

// memJob is a download held in memory.
type memJob struct {
	d    digest.Digest
	plan piece.Plan

	mu     sync.Mutex
	data   []byte
	done   []bool
	source map[string]int // pieces by parent
}

func newMemJob(d digest.Digest, size int64) *memJob {
	plan := piece.PlanFor(size)
	return &memJob{d: d, plan: plan, data: make([]byte, size), done: make([]bool, plan.Count()), source: map[string]int{}}
}

func (j *memJob) Digest() digest.Digest { return j.d }
func (j *memJob) Plan() piece.Plan      { return j.plan }
func (j *memJob) Next() int             { return -1 }

func (j *memJob) Has(i int) bool {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.done[i]
}

func (j *memJob) Put(i int, r io.Reader, source string, want collector.Expect) error {
	off, n := j.plan.Range(i)
	b, err := io.ReadAll(io.LimitReader(r, n+1))
	if err != nil {
		return err
	}
	if int64(len(b)) != n {
		return fmt.Errorf("piece %d: %d bytes, want %d", i, len(b), n)
	}
	if want.Known && piece.Checksum(b) != want.CRC {
		return collector.ErrChecksum
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	copy(j.data[off:], b)
	if !j.done[i] {
		j.done[i] = true
		j.source[source]++
	}
	return nil
}

// fakeNode is another member as the transport reaches it.
type fakeNode struct {
	down     bool                 // Register and Watch fail
	resp     *pb.RegisterResponse // Register's answer
	then     *pb.RegisterResponse // Register's answer after the first, if set
	asked    atomic.Int64
	updates  []*pb.PieceUpdate // sent on Watch, then the stream waits
	ends     bool              // the stream ends after its updates (as a complete parent's does)
	slow     time.Duration     // each piece fetch takes this long
	fetches  atomic.Int64
	watchers atomic.Int64
}

// fakeCluster is the transport: every other node by address, the blob they
// hold, and the Register requests seen.
type fakeCluster struct {
	nodes map[string]*fakeNode
	data  []byte

	mu       sync.Mutex
	register []string // addresses, in order
	requests []*pb.RegisterRequest
}

func (c *fakeCluster) Register(_ context.Context, addr string, req *pb.RegisterRequest) (*pb.RegisterResponse, error) {
	c.mu.Lock()
	c.register = append(c.register, addr)
	c.requests = append(c.requests, req)
	c.mu.Unlock()
	n := c.nodes[addr]
	if n == nil || n.down {
		return nil, errors.New("connection refused")
	}
	if n.asked.Add(1) > 1 && n.then != nil {
		return n.then, nil
	}
	return n.resp, nil
}

func (c *fakeCluster) Watch(ctx context.Context, addr string, _ digest.Digest, _ string, fn func(*pb.PieceUpdate)) error {
	n := c.nodes[addr]
	if n == nil || n.down {
		return errors.New("connection refused")
	}
	n.watchers.Add(1)
	for _, up := range n.updates {
		fn(up)
	}
	if n.ends {
		return nil
	}
	<-ctx.Done()
	return ctx.Err()
}

func (c *fakeCluster) Parent(id, addr string, _ digest.Digest) collector.Parent {
	return &peerParent{id: id, node: c.nodes[addr], data: c.data}
}

func (c *fakeCluster) registered() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.register)
}

type peerParent struct {
	id   string
	node *fakeNode
	data []byte
}

func (p *peerParent) ID() string { return p.id }

func (p *peerParent) Fetch(_ context.Context, _ int, off, n int64) (io.ReadCloser, error) {
	p.node.fetches.Add(1)
	time.Sleep(p.node.slow)
	return io.NopCloser(bytes.NewReader(p.data[off : off+n])), nil
}

// countingUpstream is the registry.
type countingUpstream struct {
	data  []byte
	bytes atomic.Int64
}

func (u *countingUpstream) Blob(_ context.Context, _, _ string, _ digest.Digest, off, n int64, _ http.Header) (io.ReadCloser, bool, error) {
	u.bytes.Add(n)
	return io.NopCloser(bytes.NewReader(u.data[off : off+n])), false, nil
}

// only is the update of a complete parent cut down to pieces.
func only(whole *pb.PieceUpdate, pieces ...int) *pb.PieceUpdate {
	up := &pb.PieceUpdate{Digest: whole.Digest, Size: whole.Size, PieceSize: whole.PieceSize}
	for _, i := range pieces {
		up.Pieces = append(up.Pieces, whole.Pieces[i])
	}
	return up
}

// complete is a node's update saying it has the whole blob.
func complete(d digest.Digest, data []byte) *pb.PieceUpdate {
	plan := piece.PlanFor(int64(len(data)))
	up := &pb.PieceUpdate{Digest: d.String(), Size: plan.Size, PieceSize: plan.PieceSize, Complete: true}
	for i := range plan.Count() {
		off, n := plan.Range(i)
		up.Pieces = append(up.Pieces, &pb.Piece{Index: uint32(i), Checksum: piece.Checksum(data[off : off+n])})
	}
	return up
}

// ranked returns n member ids, in the digest's owner order.
func ranked(d digest.Digest, n int) []string {
	var ids []string
	for i := range n {
		ids = append(ids, fmt.Sprintf("node-%d", i))
	}
	return owner.Rank(d.String(), ids)
}

func addrOf(id string) string { return id + ":7000" }

// membersOf is the members with these ids, each at addrOf(id).
func membersOf(ids []string) staticMembers {
	var m staticMembers
	for _, id := range ids {
		m = append(m, membership.Member{ID: id, Addr: addrOf(id)})
	}
	return m
}

// newTestCluster is a cluster of n members, none set up yet, and a random
// blob of size bytes (from seed) that they can hold.
func newTestCluster(seed byte, size int64, n int) (*fakeCluster, digest.Digest, []string) {
	data := make([]byte, size)
	rand.NewChaCha8([32]byte{seed}).Read(data)
	d := digest.FromBytes(data)
	return &fakeCluster{nodes: map[string]*fakeNode{}, data: data}, d, ranked(d, n)
}

func TestDownloader(t *testing.T) {
	data := make([]byte, 3*piece.MinSize+5)
	rng := rand.NewChaCha8([32]byte{1})
	rng.Read(data)
	d := digest.FromBytes(data)
	rank := ranked(d, 4)
	for _, tc := range []struct {
		name string
		self int // this node's place in rank
		// nodes by rank place: nil is not set up (down).
		setup         func(c *fakeCluster, d digest.Digest)
		wantRegister  []int // rank places asked, in order
		wantUpstream  bool  // every byte from the upstream
		wantFrom      int   // else: every piece from this rank place
		wantNoFetches []int // rank places never fetched from
	}{
		{
			name: "this node owns the digest: the upstream, nobody asked",
			self: 0, wantUpstream: true,
		},
		{
			name: "the owner answers and has the blob",
			self: 2,
			setup: func(c *fakeCluster, d digest.Digest) {
				c.nodes[addrOf(rank[0])] = &fakeNode{resp: &pb.RegisterResponse{Size: int64(len(data))}, updates: []*pb.PieceUpdate{complete(d, data)}}
			},
			wantRegister: []int{0}, wantFrom: 0,
		},
		{
			name: "the owner is down: the next in rank",
			self: 3,
			setup: func(c *fakeCluster, d digest.Digest) {
				c.nodes[addrOf(rank[0])] = &fakeNode{down: true}
				c.nodes[addrOf(rank[1])] = &fakeNode{resp: &pb.RegisterResponse{}, updates: []*pb.PieceUpdate{complete(d, data)}}
			},
			wantRegister: []int{0, 1}, wantFrom: 1,
		},
		{
			name: "nobody answers: the upstream",
			self: 3,
			setup: func(c *fakeCluster, _ digest.Digest) {
				for _, id := range rank[:3] {
					c.nodes[addrOf(id)] = &fakeNode{down: true}
				}
			},
			wantRegister: []int{0, 1, 2}, wantUpstream: true,
		},
		{
			name: "the owner cannot fetch a private blob: this node does",
			self: 1,
			setup: func(c *fakeCluster, _ digest.Digest) {
				c.nodes[addrOf(rank[0])] = &fakeNode{resp: &pb.RegisterResponse{FetchYourself: true}}
			},
			wantRegister: []int{0}, wantUpstream: true,
		},
		{
			name: "a peer announcing another blob is ignored",
			self: 3,
			setup: func(c *fakeCluster, d digest.Digest) {
				c.nodes[addrOf(rank[0])] = &fakeNode{
					resp:    &pb.RegisterResponse{Peers: []*pb.PeerRef{{Id: rank[1], Addr: addrOf(rank[1])}}},
					updates: []*pb.PieceUpdate{complete(d, data)},
				}
				other := complete(digest.FromString("another blob"), data)
				c.nodes[addrOf(rank[1])] = &fakeNode{updates: []*pb.PieceUpdate{other}}
			},
			wantRegister: []int{0}, wantFrom: 0, wantNoFetches: []int{1},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				self := rank[tc.self]
				c := &fakeCluster{nodes: map[string]*fakeNode{}, data: data}
				if tc.setup != nil {
					tc.setup(c, d)
				}
				members := membersOf(rank)
				up := &countingUpstream{data: data}
				dl := NewDownloader(DownloaderOptions{
					Self: membership.Member{ID: self, Addr: addrOf(self)}, Members: members, Transport: c,
					Collector: collector.New(collector.Options{Concurrency: 4, Logger: slog.New(slog.DiscardHandler)}),
					Upstream:  up, Logger: slog.New(slog.DiscardHandler),
				})
				job := newMemJob(d, int64(len(data)))
				if err := dl.Fill(context.Background(), job, task.Request{Digest: d, Registry: "reg.test", Repo: "team/app"}); err != nil {
					t.Fatalf("Fill: %v", err)
				}
				if !bytes.Equal(job.data, data) {
					t.Fatal("the job's bytes differ from the blob")
				}
				var want []string
				for _, k := range tc.wantRegister {
					want = append(want, addrOf(rank[k]))
				}
				if got := c.registered(); !slices.Equal(got, want) {
					t.Errorf("registered with %v, want %v", got, want)
				}
				for _, req := range c.requests {
					if req.GetHostId() != self || req.GetAddr() != addrOf(self) || req.GetDigest() != d.String() ||
						req.GetRegistry() != "reg.test" || req.GetRepository() != "team/app" {
						t.Errorf("register request %v", req)
					}
				}
				switch {
				case tc.wantUpstream:
					if got := up.bytes.Load(); got != int64(len(data)) {
						t.Errorf("upstream sent %d bytes, want %d (pieces by parent %v)", got, len(data), job.source)
					}
				default:
					if got := up.bytes.Load(); got != 0 {
						t.Errorf("upstream sent %d bytes, want 0 (pieces by parent %v)", got, job.source)
					}
					if got := job.source[rank[tc.wantFrom]]; got != job.plan.Count() {
						t.Errorf("%d of %d pieces from %s; by parent %v", got, job.plan.Count(), rank[tc.wantFrom], job.source)
					}
				}
				for _, k := range tc.wantNoFetches {
					if n := c.nodes[addrOf(rank[k])]; n.fetches.Load() != 0 {
						t.Errorf("%s was fetched from %d times", rank[k], n.fetches.Load())
					}
				}
				if _, _, ok := dl.Progress(d); ok {
					t.Error("the download is still listed after Fill returned")
				}
			})
		})
	}
}

// A node the owner delegated pieces to reads them from the upstream, and
// the rest from the owner.
func TestDownloaderReadsDelegatedPieces(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, d, rank := newTestCluster(2, 4*piece.MinSize, 2)
		data := c.data
		// The owner has the pieces it did not delegate (it leaves the
		// others to this node), and the upstream is not this node's to use.
		partial := complete(d, data)
		partial.Complete = false
		partial.Pieces = []*pb.Piece{partial.Pieces[0], partial.Pieces[2]}
		c.nodes[addrOf(rank[0])] = &fakeNode{resp: &pb.RegisterResponse{UpstreamPieces: []uint32{1, 3}}, updates: []*pb.PieceUpdate{partial}}
		up := &countingUpstream{data: data}
		dl := NewDownloader(DownloaderOptions{
			Self: membership.Member{ID: rank[1], Addr: addrOf(rank[1])}, Members: membersOf(rank),
			Transport: c, Collector: collector.New(collector.Options{Concurrency: 4, Logger: slog.New(slog.DiscardHandler)}),
			Upstream: up, Logger: slog.New(slog.DiscardHandler),
		})
		job := newMemJob(d, int64(len(data)))
		if err := dl.Fill(context.Background(), job, task.Request{Digest: d}); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(job.data, data) {
			t.Fatal("the job's bytes differ from the blob")
		}
		if got := up.bytes.Load(); got != 2*piece.MinSize {
			t.Errorf("upstream sent %d bytes, want the two delegated pieces (%d)", got, 2*piece.MinSize)
		}
		if got := job.source[rank[0]]; got != 2 {
			t.Errorf("%d pieces from the owner, want 2 (by parent %v)", got, job.source)
		}
	})
}

// A parent that said it is complete and ended its stream stays followed:
// it is not watched again at each refresh, and its place among MaxPeers is
// not given to another.
func TestDownloaderKeepsCompleteParent(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, d, rank := newTestCluster(3, 4*piece.MinSize, 4)
		data := c.data
		// The owner has nothing yet and names a registered peer that has
		// the blob and sends it slowly (several refreshes); later, another
		// peer first.
		p1, p2 := &pb.PeerRef{Id: rank[1], Addr: addrOf(rank[1])}, &pb.PeerRef{Id: rank[2], Addr: addrOf(rank[2])}
		c.nodes[addrOf(rank[0])] = &fakeNode{resp: &pb.RegisterResponse{Peers: []*pb.PeerRef{p1}}, then: &pb.RegisterResponse{Peers: []*pb.PeerRef{p2, p1}}}
		c.nodes[addrOf(rank[1])] = &fakeNode{updates: []*pb.PieceUpdate{complete(d, data)}, ends: true, slow: 5 * time.Second}
		c.nodes[addrOf(rank[2])] = &fakeNode{}
		members := membersOf(rank)
		dl := NewDownloader(DownloaderOptions{
			Self: membership.Member{ID: rank[3], Addr: addrOf(rank[3])}, Members: members, Transport: c,
			Collector: collector.New(collector.Options{Concurrency: 4, Logger: slog.New(slog.DiscardHandler)}),
			Upstream:  &countingUpstream{data: data}, Logger: slog.New(slog.DiscardHandler), MaxPeers: 1,
		})
		job := newMemJob(d, int64(len(data)))
		if err := dl.Fill(context.Background(), job, task.Request{Digest: d}); err != nil {
			t.Fatal(err)
		}
		if n := len(c.registered()); n < 4 {
			t.Fatalf("registered %d times; the test needs several refreshes during the download", n)
		}
		if got := c.nodes[addrOf(rank[1])].watchers.Load(); got != 1 {
			t.Errorf("the complete parent was watched %d times, want once", got)
		}
		// MaxPeers 1: the owner and one more.
		if got := c.nodes[addrOf(rank[2])].watchers.Load(); got != 0 {
			t.Errorf("a third parent was watched %d times (the complete one's place given away)", got)
		}
	})
}

// A reader the owner names once the node's parents are full is followed
// all the same: it holds pieces no other node has (the owner delegated
// them), and the node is not to read them from the upstream.
func TestDownloaderFollowsReadersBeyondMaxPeers(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, d, rank := newTestCluster(4, 4*piece.MinSize, 4)
		data := c.data
		whole := complete(d, data)
		peer, reader := &pb.PeerRef{Id: rank[1], Addr: addrOf(rank[1])}, &pb.PeerRef{Id: rank[2], Addr: addrOf(rank[2])}
		// First the owner names a peer (the node's one place beside the
		// owner), then, the reader chosen, the reader too.
		c.nodes[addrOf(rank[0])] = &fakeNode{
			resp:    &pb.RegisterResponse{Peers: []*pb.PeerRef{peer}},
			then:    &pb.RegisterResponse{Peers: []*pb.PeerRef{peer}, Readers: []*pb.PeerRef{reader}},
			updates: []*pb.PieceUpdate{only(whole, 0, 2)},
		}
		c.nodes[addrOf(rank[1])] = &fakeNode{updates: []*pb.PieceUpdate{only(whole, 0)}}
		c.nodes[addrOf(rank[2])] = &fakeNode{updates: []*pb.PieceUpdate{only(whole, 1, 3)}}
		up := &countingUpstream{data: data}
		dl := NewDownloader(DownloaderOptions{
			Self: membership.Member{ID: rank[3], Addr: addrOf(rank[3])}, Members: membersOf(rank), Transport: c,
			Collector: collector.New(collector.Options{Concurrency: 4, Logger: slog.New(slog.DiscardHandler)}),
			Upstream:  up, Logger: slog.New(slog.DiscardHandler), MaxPeers: 1,
		})
		job := newMemJob(d, int64(len(data)))
		if err := dl.Fill(context.Background(), job, task.Request{Digest: d}); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(job.data, data) {
			t.Fatal("the job's bytes differ from the blob")
		}
		if got := c.nodes[addrOf(rank[2])].watchers.Load(); got != 1 {
			t.Errorf("the reader was watched %d times, want once", got)
		}
		if got := job.source[rank[2]]; got != 2 {
			t.Errorf("%d pieces from the reader, want its 2 (by parent %v)", got, job.source)
		}
		if got := up.bytes.Load(); got != 0 {
			t.Errorf("the upstream sent %d bytes, want none", got)
		}
	})
}

// An answer naming more readers than maxReaders makes the node follow
// maxReaders of them beyond MaxPeers, not the whole list.
func TestDownloaderFollowsAtMostMaxReaders(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const named = maxReaders + 4
		c, d, rank := newTestCluster(5, 2*piece.MinSize, named+2)
		var readers []*pb.PeerRef
		for _, id := range rank[1 : named+1] {
			readers = append(readers, &pb.PeerRef{Id: id, Addr: addrOf(id)})
			c.nodes[addrOf(id)] = &fakeNode{}
		}
		c.nodes[addrOf(rank[0])] = &fakeNode{resp: &pb.RegisterResponse{Readers: readers}, updates: []*pb.PieceUpdate{complete(d, c.data)}}
		self := rank[named+1]
		dl := NewDownloader(DownloaderOptions{
			Self: membership.Member{ID: self, Addr: addrOf(self)}, Members: membersOf(rank), Transport: c,
			Collector: collector.New(collector.Options{Concurrency: 4, Logger: slog.New(slog.DiscardHandler)}),
			Upstream:  &countingUpstream{data: c.data}, Logger: slog.New(slog.DiscardHandler), MaxPeers: 1,
		})
		job := newMemJob(d, int64(len(c.data)))
		if err := dl.Fill(context.Background(), job, task.Request{Digest: d}); err != nil {
			t.Fatal(err)
		}
		watched := 0
		for _, r := range readers {
			if c.nodes[r.GetAddr()].watchers.Load() > 0 {
				watched++
			}
		}
		if watched != maxReaders {
			t.Errorf("followed %d of %d named readers with MaxPeers 1, want %d", watched, named, maxReaders)
		}
	})
}

// Children that begin to follow a node all at once (a cluster registers
// within a second) are all followed back, up to maxFollowedBack: none is
// dropped for arriving in a burst, the last of them included.
func TestDownloaderFollowsBackABurstOfChildren(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const burst, maxPeers = 20, 40 // maxFollowedBack(40) = 20
		c, d, rank := newTestCluster(7, 4*piece.MinSize, burst+2)
		whole := complete(d, c.data)
		c.nodes[addrOf(rank[0])] = &fakeNode{resp: &pb.RegisterResponse{}, updates: []*pb.PieceUpdate{only(whole, 0, 1)}}
		children := rank[1 : burst+1]
		for _, id := range children[:burst-1] {
			c.nodes[addrOf(id)] = &fakeNode{}
		}
		last := children[burst-1] // the only holder of pieces 2 and 3
		c.nodes[addrOf(last)] = &fakeNode{updates: []*pb.PieceUpdate{only(whole, 2, 3)}}
		self := rank[burst+1]
		dl := NewDownloader(DownloaderOptions{
			Self: membership.Member{ID: self, Addr: addrOf(self)}, Members: membersOf(rank), Transport: c,
			Collector: collector.New(collector.Options{Concurrency: 4, Logger: slog.New(slog.DiscardHandler)}),
			Upstream:  &countingUpstream{data: c.data}, Logger: slog.New(slog.DiscardHandler), MaxPeers: maxPeers,
		})
		job := newMemJob(d, int64(len(c.data)))
		errc := make(chan error, 1)
		go func() { errc <- dl.Fill(context.Background(), job, task.Request{Digest: d}) }()
		synctest.Wait() // pieces 0 and 1 in; 2 and 3 held by no parent yet
		for _, id := range children {
			dl.FollowBack(d, membership.Member{ID: id, Addr: addrOf(id)})
		}
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
		var unwatched []string
		for _, id := range children {
			if c.nodes[addrOf(id)].watchers.Load() != 1 {
				unwatched = append(unwatched, id)
			}
		}
		if len(unwatched) > 0 {
			t.Errorf("%d of %d children not followed back once: %v", len(unwatched), burst, unwatched)
		}
		if got := job.source[last]; got != 2 {
			t.Errorf("%d pieces from the last child of the burst, want 2 (by parent %v)", got, job.source)
		}
	})
}

// A member that follows this node is followed back, beyond MaxPeers and at
// most maxFollowedBack of them: here the pieces the owner's peers lack come from
// the one child followed back, none from the upstream, and a second child
// past the bound is not watched.
func TestDownloaderFollowsChildrenBack(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c, d, rank := newTestCluster(6, 4*piece.MinSize, 5)
		whole := complete(d, c.data)
		peer := &pb.PeerRef{Id: rank[1], Addr: addrOf(rank[1])}
		c.nodes[addrOf(rank[0])] = &fakeNode{resp: &pb.RegisterResponse{Peers: []*pb.PeerRef{peer}}, updates: []*pb.PieceUpdate{only(whole, 0)}}
		c.nodes[addrOf(rank[1])] = &fakeNode{updates: []*pb.PieceUpdate{only(whole, 1)}}
		c.nodes[addrOf(rank[2])] = &fakeNode{updates: []*pb.PieceUpdate{only(whole, 2, 3)}}
		c.nodes[addrOf(rank[3])] = &fakeNode{updates: []*pb.PieceUpdate{only(whole, 2, 3)}}
		up := &countingUpstream{data: c.data}
		self := rank[4]
		dl := NewDownloader(DownloaderOptions{
			Self: membership.Member{ID: self, Addr: addrOf(self)}, Members: membersOf(rank), Transport: c,
			Collector: collector.New(collector.Options{Concurrency: 4, Logger: slog.New(slog.DiscardHandler)}),
			Upstream:  up, Logger: slog.New(slog.DiscardHandler), MaxPeers: 1,
		})
		job := newMemJob(d, int64(len(c.data)))
		errc := make(chan error, 1)
		go func() { errc <- dl.Fill(context.Background(), job, task.Request{Digest: d}) }()
		synctest.Wait() // pieces 0 and 1 in; 2 and 3 held by no parent
		for _, id := range rank[2:4] {
			dl.FollowBack(d, membership.Member{ID: id, Addr: addrOf(id)})
		}
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(job.data, c.data) {
			t.Fatal("the job's bytes differ from the blob")
		}
		if got := job.source[rank[2]]; got != 2 {
			t.Errorf("%d pieces from the child followed back, want 2 (by parent %v)", got, job.source)
		}
		if got := c.nodes[addrOf(rank[3])].watchers.Load(); got != 0 {
			t.Errorf("a child past MaxPeers was watched %d times, want none", got)
		}
		if got := up.bytes.Load(); got != 0 {
			t.Errorf("the upstream sent %d bytes, want none", got)
		}
		// No download of d runs now: nothing to follow back, and no block.
		dl.FollowBack(d, membership.Member{ID: rank[3], Addr: addrOf(rank[3])})
	})
}
