package swarm

import (
	"context"
	"log/slog"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/p2p/collector"
	"github.com/registry-proxy/registry-proxy/p2p/membership"
	"github.com/registry-proxy/registry-proxy/p2p/pb"
	"github.com/registry-proxy/registry-proxy/piece"
	"github.com/registry-proxy/registry-proxy/task"
)

// stallingCluster is a fakeCluster where some owners accept a registration
// and never answer (a tarpit, a stopped process), and some never answered
// at all (Answered).
type stallingCluster struct {
	*fakeCluster
	stalls   map[string]bool
	silent   map[string]bool // never answered: Answered says false
	start    time.Time
	mu       sync.Mutex
	askedAt  map[string]time.Duration
	answered [][]string
}

func (c *stallingCluster) Register(ctx context.Context, addr string, req *pb.RegisterRequest) (*pb.RegisterResponse, error) {
	c.mu.Lock()
	if _, ok := c.askedAt[addr]; !ok {
		c.askedAt[addr] = time.Since(c.start)
	}
	c.mu.Unlock()
	if c.stalls[addr] {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	return c.fakeCluster.Register(ctx, addr, req)
}

func (c *stallingCluster) Answered(addrs []string) []bool {
	out := make([]bool, len(addrs))
	for i, a := range addrs {
		out[i] = !c.silent[a]
	}
	c.mu.Lock()
	c.answered = append(c.answered, slices.Clone(addrs))
	c.mu.Unlock()
	return out
}

func TestDownloaderFailsOverFast(t *testing.T) {
	data := make([]byte, 3*piece.MinSize+5)
	rand.NewChaCha8([32]byte{7}).Read(data)
	d := digest.FromBytes(data)
	rank := ranked(d, 5)
	for _, tc := range []struct {
		name   string
		stalls []int // rank places that never answer a registration
		silent []int // rank places whose peer port never answered
		from   int   // the rank place the pieces come from
		within time.Duration
		never  []int // rank places never asked
	}{
		{name: "the owner stalls: the next asked after hedgeAfter", stalls: []int{0}, from: 1, within: hedgeAfter},
		{name: "two stall: the third", stalls: []int{0, 1}, from: 2, within: 2 * hedgeAfter},
		{name: "never answered: not ranked, not asked", silent: []int{0, 1}, from: 2, within: 0, never: []int{0, 1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				self := rank[4]
				fc := &fakeCluster{nodes: map[string]*fakeNode{}, data: data}
				c := &stallingCluster{fakeCluster: fc, stalls: map[string]bool{}, silent: map[string]bool{}, askedAt: map[string]time.Duration{}, start: time.Now()}
				for _, i := range tc.stalls {
					c.stalls[addrOf(rank[i])] = true
				}
				for _, i := range tc.silent {
					c.silent[addrOf(rank[i])] = true
				}
				for i := range 4 {
					fc.nodes[addrOf(rank[i])] = &fakeNode{resp: &pb.RegisterResponse{Size: int64(len(data))}, updates: []*pb.PieceUpdate{complete(d, data)}}
				}
				dl := NewDownloader(DownloaderOptions{
					Self: membership.Member{ID: self, Addr: addrOf(self)}, Members: membersOf(rank), Transport: c,
					Collector: collector.New(collector.Options{Concurrency: 4, Logger: slog.New(slog.DiscardHandler)}),
					Upstream:  &countingUpstream{data: data}, Logger: slog.New(slog.DiscardHandler),
				})
				job := newMemJob(d, int64(len(data)))
				if err := dl.Fill(context.Background(), job, task.Request{Digest: d, Registry: "reg.test", Repo: "team/app"}); err != nil {
					t.Fatal(err)
				}
				c.mu.Lock()
				defer c.mu.Unlock()
				at, ok := c.askedAt[addrOf(rank[tc.from])]
				if !ok || at > tc.within {
					t.Fatalf("rank %d asked after %v (asked: %v), want within %v", tc.from, at, ok, tc.within)
				}
				for _, i := range tc.never {
					if _, ok := c.askedAt[addrOf(rank[i])]; ok {
						t.Errorf("rank %d, which never answered, was asked", i)
					}
				}
				if got := fc.nodes[addrOf(rank[tc.from])].fetches.Load(); got == 0 {
					t.Errorf("no piece from rank %d", tc.from)
				}
				for _, addrs := range c.answered {
					if slices.Contains(addrs, addrOf(self)) {
						t.Fatalf("this node's own address probed: %v", addrs)
					}
				}
			})
		})
	}
}
