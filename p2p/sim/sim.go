// Package sim is a discrete-event simulation of a registry-proxy cluster
// pulling one blob. Each node runs the project's own download coordinator
// (swarm.Downloader: owner ranking, registration, following parents,
// refreshes), piece collector, tracker, the owner's side of registration
// (swarm.Server.Register, state-aware seeding included), upload admission
// (peer.Admission, super-seeding) and host-state meter over a simulated
// network of hosts with upload and download capacities and a one-way
// latency; only the transport (gRPC streams, HTTP piece requests, disks) is
// replaced, behind swarm.Transport, and the piece stream (WatchPieces) is
// simulated: one update per new piece.
//
// Run must be called inside a testing/synctest bubble: the bubble's fake
// clock is the simulation clock, and it advances whenever every simulated
// goroutine waits, so the collector's own timers, back-offs and timeouts run
// unchanged at simulated speed.
package sim

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"math/rand/v2"
	"net/http"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"

	grpcpeer "google.golang.org/grpc/peer"

	"github.com/registry-proxy/registry-proxy/blobstore"
	"github.com/registry-proxy/registry-proxy/internal/report"
	"github.com/registry-proxy/registry-proxy/p2p/collector"
	"github.com/registry-proxy/registry-proxy/p2p/hoststate"
	"github.com/registry-proxy/registry-proxy/p2p/membership"
	"github.com/registry-proxy/registry-proxy/p2p/owner"
	"github.com/registry-proxy/registry-proxy/p2p/pb"
	"github.com/registry-proxy/registry-proxy/p2p/peer"
	"github.com/registry-proxy/registry-proxy/p2p/seeding"
	"github.com/registry-proxy/registry-proxy/p2p/swarm"
	"github.com/registry-proxy/registry-proxy/p2p/tracker"
	"github.com/registry-proxy/registry-proxy/piece"
	"github.com/registry-proxy/registry-proxy/task"
)

// Direct is the mode in which every node pulls from the upstream alone.
const Direct = "direct"

// Config is one simulated pull.
type Config struct {
	Nodes int
	Size  int64 // blob bytes
	// MinPiece is the smallest piece (pieces.min_size); 0: piece.MinSize.
	MinPiece int64
	// Up and Down are each node's capacities, OriginUp the upstream
	// registry's upload capacity, in bytes/s.
	Up, Down, OriginUp float64
	// Latency is one way, between any two hosts.
	Latency time.Duration
	// Step, when set, ends every transfer on a multiple of it (a transfer
	// ends at most Step late). The clock moves once for all the events an
	// instant holds and runs their goroutines side by side, where exact
	// ends give each event an instant of its own.
	Step time.Duration
	// Selector is collector.SelectorState, collector.SelectorFCFS or Direct.
	Selector string
	// Throttled nodes upload at a tenth of Up; Loaded nodes run
	// background uploads (LoadFlows of them) to a host outside the swarm.
	Throttled, Loaded, LoadFlows int
	// SlowOwner makes the digest's owner one of the Throttled nodes.
	SlowOwner bool
	// NoDelegation turns state-aware seeding off (a slow owner hands no
	// pieces to faster nodes), to measure what it brings.
	NoDelegation bool
	// Spread draws each node's Up uniformly from [Up·(1−Spread), Up·(1+Spread)].
	Spread float64
	// Waves start the nodes in that many equal groups, WaveGap apart.
	Waves   int
	WaveGap time.Duration
	// Defaults of the real node when zero.
	Concurrency, UpstreamConcurrency, UploadLimit, MaxPeers, PerParent, Window, Urgent, Readers int
	SyncInterval, Refresh                                                                       time.Duration
	Seed                                                                                        uint64
	// NoSeeding lets parents send duplicates freely (see package seeding).
	NoSeeding bool
	// Horizon stops the simulation at this simulated time; 0: none.
	Horizon time.Duration
	// Progress, when set, is called every simulated second with the
	// simulated time and the nodes done so far.
	Progress func(at time.Duration, done int)
	// Trace, when set, gets the cluster's state every simulated second
	// (with Progress): pieces held, holders, parents and children, upload
	// and download use, flows, refusals, the unfinished nodes whose upload
	// idles and what their children lack, the nodes furthest behind, the
	// upstream's readers, and the nodes that alone hold pieces.
	Trace io.Writer
}

func (c *Config) defaults() {
	if c.Concurrency <= 0 {
		c.Concurrency = 8
	}
	if c.UploadLimit <= 0 {
		c.UploadLimit = 16
	}
	if c.PerParent <= 0 {
		c.PerParent = 1
	}
	if c.UpstreamConcurrency <= 0 {
		c.UpstreamConcurrency = c.Concurrency
	}
	if c.MaxPeers <= 0 {
		c.MaxPeers = 32
	}
	if c.SyncInterval <= 0 {
		c.SyncInterval = 3 * time.Second
	}
	if c.Refresh <= 0 {
		c.Refresh = time.Second
	}
	if c.Waves <= 0 {
		c.Waves = 1
	}
	if c.LoadFlows <= 0 {
		c.LoadFlows = 8
	}
}

// Bound is the Kumar–Ross lower bound on the time for every node to hold
// the blob: max(F/u_origin, F/d_min, N·F/(u_origin + Σu_i)).
func Bound(size int64, originUp float64, ups, downs []float64) time.Duration {
	return time.Duration(report.KumarRoss(float64(size), originUp, ups, downs) * 1e9)
}

// Result is what one simulated pull measured.
type Result struct {
	Config     Config
	Completion []time.Duration // per node, from its own start
	Bound      time.Duration
	// UpstreamBytes is what the registry sent; SentBy the bytes each node
	// uploaded to its peers.
	UpstreamBytes int64
	// OriginBusy is when the upstream sent its last byte, from the start:
	// beside Bound, how well the engine kept the registry busy.
	OriginBusy time.Duration
	SentBy     []int64
	Flows      int64
	// Refused are the piece requests parents refused (busy, or sent
	// elsewhere): each a round trip that moved no piece.
	Refused int64
	// RefusedBusy are the refusals of a parent at its upload limit; the
	// rest were pieces it had sent elsewhere.
	RefusedBusy int64
	// Unfinished nodes were still pulling at the horizon; their Completion
	// is -1.
	Unfinished int
}

// Run simulates cfg inside the calling synctest bubble.
func Run(ctx context.Context, cfg Config) (Result, error) {
	cfg.defaults()
	if cfg.Nodes < 1 || cfg.Size < 1 || cfg.Up <= 0 || cfg.Down <= 0 || cfg.OriginUp <= 0 {
		return Result{}, errors.New("sim: nodes, size and capacities must be positive")
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s := newSim(cfg)
	s.ctx = ctx

	var bg sync.WaitGroup
	defer bg.Wait()
	defer cancel()
	bg.Go(func() { s.net.run(ctx) })
	for _, n := range s.nodes {
		// Nodes have run before the pull: every state is out before it
		// starts, as in the namespace harness.
		_, _ = n.meter.Sample(ctx)
		n.published.Store(n.meter.State().Proto())
		bg.Go(func() { n.publishState(ctx) })
	}
	for _, n := range s.loaded {
		for range cfg.LoadFlows {
			bg.Go(func() {
				for ctx.Err() == nil {
					_ = s.net.transfer(ctx, n.h, s.sink, 64<<20)
				}
			})
		}
	}

	s.start = time.Now()
	per := (cfg.Nodes + cfg.Waves - 1) / cfg.Waves
	errs := make([]error, cfg.Nodes)
	res := Result{Config: cfg, Completion: make([]time.Duration, cfg.Nodes), SentBy: make([]int64, cfg.Nodes)}
	var finished atomic.Int64
	if cfg.Progress != nil {
		bg.Go(func() {
			start := time.Now()
			for {
				select {
				case <-ctx.Done():
					return
				case <-time.After(time.Second):
					cfg.Progress(time.Since(start), int(finished.Load()))
					if cfg.Trace != nil {
						s.trace(cfg.Trace, time.Since(start))
					}
				}
			}
		})
	}
	var unfinished atomic.Int64
	pullCtx := ctx
	if cfg.Horizon > 0 {
		var stop context.CancelFunc
		pullCtx, stop = context.WithTimeout(ctx, cfg.Horizon)
		defer stop()
	}
	var wg sync.WaitGroup
	for k, n := range s.nodes {
		wg.Go(func() {
			if d := time.Duration(k/per) * cfg.WaveGap; d > 0 {
				time.Sleep(d)
			}
			start := time.Now()
			errs[k] = n.pull(pullCtx)
			res.Completion[k] = time.Since(start)
			if errs[k] != nil && pullCtx.Err() != nil && ctx.Err() == nil {
				// Past the horizon: censored, not failed.
				errs[k] = nil
				res.Completion[k] = -1
				unfinished.Add(1)
			}
			finished.Add(1)
		})
	}
	wg.Wait()
	cancel()
	bg.Wait()
	res.Unfinished = int(unfinished.Load())

	ups, downs := make([]float64, cfg.Nodes), make([]float64, cfg.Nodes)
	for k, n := range s.nodes {
		ups[k], downs[k] = n.h.up, n.h.down
		res.SentBy[k] = int64(n.h.sent)
	}
	res.Bound = Bound(cfg.Size, cfg.OriginUp, ups, downs)
	res.UpstreamBytes = int64(s.origin.sent)
	res.OriginBusy = time.Duration(s.lastOrigin.Load())
	res.Flows = s.net.total
	res.Refused = s.refused.Load()
	res.RefusedBusy = s.refusedBusy.Load()
	return res, errors.Join(errs...)
}

type simulation struct {
	ctx    context.Context // the whole run's: downloads outlive the request that started them
	cfg    Config
	net    *network
	digest digest.Digest
	plan   piece.Plan
	origin *host
	sink   *host
	nodes  []*node // node k's id is nodeID(k)
	ids    []string
	loaded []*node
	owner  string
	// members are every node, ids as addresses.
	members []membership.Member
	start   time.Time
	// lastOrigin is when the upstream last finished a transfer.
	lastOrigin atomic.Int64
	refused    atomic.Int64
	// refusedBusy are the refusals at the upload limit.
	refusedBusy atomic.Int64
	// ownerRefused are the refusals by the digest's owner (Trace).
	ownerRefused atomic.Int64
}

func newSim(cfg Config) *simulation {
	rng := rand.New(rand.NewPCG(cfg.Seed, 0x5eed))
	pieces := piece.Planner{Min: cfg.MinPiece}
	s := &simulation{
		cfg:    cfg,
		net:    newNetwork(cfg.Step),
		digest: digest.FromString(fmt.Sprintf("sim blob %d", cfg.Seed)),
		plan:   pieces.For(cfg.Size),
		origin: &host{up: cfg.OriginUp, down: cfg.OriginUp},
		sink:   &host{up: math.MaxFloat64 / 4, down: math.MaxFloat64 / 4},
	}
	for k := range cfg.Nodes {
		up := cfg.Up
		if cfg.Spread > 0 {
			up *= 1 - cfg.Spread + 2*cfg.Spread*rng.Float64()
		}
		n := &node{s: s, id: nodeID(k), h: &host{up: up, down: cfg.Down}}
		s.nodes = append(s.nodes, n)
		s.ids = append(s.ids, n.id)
		s.members = append(s.members, membership.Member{ID: n.id, Addr: n.id})
	}
	// Slow and loaded parents are drawn at random, and never the owner (a
	// slow owner measures who seeds, not the parent selection) unless
	// SlowOwner asks for it.
	own := owner.Rank(s.digest.String(), s.ids)[0]
	s.owner = own
	others := make([]*node, 0, len(s.nodes))
	for _, n := range s.nodes {
		if n.id != own {
			others = append(others, n)
		}
	}
	rng.Shuffle(len(others), func(i, j int) { others[i], others[j] = others[j], others[i] })
	if cfg.SlowOwner && cfg.Throttled > 0 {
		s.node(own).h.up /= 10
		cfg.Throttled--
	}
	for k, n := range others {
		switch {
		case k < cfg.Throttled:
			n.h.up /= 10
		case k < cfg.Throttled+cfg.Loaded:
			s.loaded = append(s.loaded, n)
		}
	}
	for k, n := range s.nodes {
		n.tracker = tracker.New(rand.New(rand.NewPCG(cfg.Seed, uint64(k)+1<<32)))
		if !cfg.NoSeeding {
			n.ledger = seeding.New(seeding.Options{})
		}
		n.meter = hoststate.New(hoststate.Options{
			Counters:    simCounters{n},
			MaxTxBps:    uint64(n.h.up),
			MaxRxBps:    uint64(n.h.down),
			UploadLimit: cfg.UploadLimit,
		})
		selector := cfg.Selector
		if selector == Direct {
			selector = collector.SelectorState
		}
		n.coll = collector.New(collector.Options{
			Concurrency:         cfg.Concurrency,
			UpstreamConcurrency: cfg.UpstreamConcurrency,
			PerParent:           cfg.PerParent,
			Window:              cfg.Window,
			Urgent:              cfg.Urgent,
			Selector:            selector,
			State:               s.state,
			Rand:                rand.New(rand.NewPCG(cfg.Seed, uint64(k))),
			Logger:              slog.New(slog.DiscardHandler),
		})
		if cfg.Selector == collector.SelectorState && !cfg.NoDelegation {
			n.delegations = &swarm.Delegations{Readers: cfg.Readers}
		}
		n.server = swarm.NewServer(swarm.ServerOptions{
			Members:     s,
			Tracker:     n.tracker,
			Store:       noBlobs{},
			Owner:       simOwner{n},
			Downloads:   n,
			MaxPeers:    cfg.MaxPeers,
			Pieces:      pieces,
			Delegations: n.delegations,
			Uploads:     simUploads{n},
			Logger:      slog.New(slog.DiscardHandler),
		})
		n.dl = swarm.NewDownloader(swarm.DownloaderOptions{
			Self:      membership.Member{ID: n.id, Addr: n.id},
			Members:   s,
			Transport: transport{n},
			Collector: n.coll,
			Tracker:   n.tracker,
			Upstream:  upstream{s: s, n: n},
			MaxPeers:  cfg.MaxPeers,
			Refresh:   cfg.Refresh,
			Logger:    slog.New(slog.DiscardHandler),
		})
	}
	return s
}

// Members implements swarm.Members: every node, always alive.
func (s *simulation) Members() []membership.Member { return s.members }

// idPrefix begins every node's id; its index follows.
const idPrefix = "node-"

// nodeID is the id (and address) of the simulation's node k.
func nodeID(k int) string { return fmt.Sprintf("%s%04d", idPrefix, k) }

// node is the node with this id, nil for none. Ids name their index: a
// child looks up each parent's state on every pick, where a map's hashing
// of the id cost 2% of a 1,000-node run.
func (s *simulation) node(id string) *node {
	k, err := strconv.Atoi(strings.TrimPrefix(id, idPrefix))
	if err != nil || k < 0 || k >= len(s.nodes) || s.nodes[k].id != id {
		return nil
	}
	return s.nodes[k]
}

// state is what a child knows of a parent: its last SyncHost message.
func (s *simulation) state(id string) (*pb.HostState, bool) {
	n := s.node(id)
	if n == nil {
		return nil, false
	}
	st := n.published.Load()
	return st, st != nil
}

// node is one registry-proxy.
type node struct {
	s         *simulation
	id        string
	h         *host
	meter     *hoststate.Meter
	coll      *collector.Collector
	tracker   *tracker.Tracker
	published atomic.Pointer[pb.HostState]
	ledger    *seeding.Ledger

	dl *swarm.Downloader
	// server is the node's tracker side, as the owner of the blob.
	server *swarm.Server
	// delegations: state-aware seeding as owner (state mode, as the node).
	delegations *swarm.Delegations

	// following counts the parents this node watches (Trace).
	following atomic.Int64
	mu        sync.Mutex
	job       *job
	watchers  []*watcher
	done      chan struct{}
	err       error
}

// watcher is a node following another's pieces: the parent's timer hands
// each update straight to the watching node's downloader, as the stream's
// receiving goroutine would, without a goroutine per watch to wake: at a
// thousand nodes waking them cost more than the updates themselves.
type watcher struct {
	child *node // the watching node (Trace)
	// mu is held while fn runs: one update at a time, as a stream
	// delivers them, and none once Watch has returned.
	mu     sync.Mutex
	fn     func(*pb.PieceUpdate)
	closed bool
}

func (w *watcher) push(up *pb.PieceUpdate) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.closed {
		w.fn(up)
	}
}

func (w *watcher) close() {
	w.mu.Lock()
	w.closed = true
	w.mu.Unlock()
}

// publishState samples the meter every second and sends the state to
// children every sync interval, as the node's meter and SyncHost server do.
func (n *node) publishState(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	last := time.Time{}
	for {
		_, _ = n.meter.Sample(ctx)
		if now := time.Now(); now.Sub(last) >= n.s.cfg.SyncInterval {
			n.published.Store(n.meter.State().Proto())
			last = now
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

type simCounters struct{ n *node }

func (c simCounters) Net(context.Context) (uint64, uint64, error) {
	rx, tx := c.n.s.net.counters(c.n.h)
	return rx, tx, nil
}
func (c simCounters) LinkSpeed(context.Context) (uint64, error) { return 0, nil }
func (c simCounters) DiskRead(context.Context) (uint64, error)  { return 0, nil }
func (c simCounters) Free(context.Context) (uint64, error)      { return 1 << 40, nil }

// pull is a client on this node reading the whole blob.
func (n *node) pull(ctx context.Context) error {
	t := n.open()
	t.reading.Store(true)
	select {
	case <-n.done:
		return n.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// open starts the node's download once, as the task manager does for a
// client or for a registration at the owner.
func (n *node) open() *job {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.job != nil {
		return n.job
	}
	n.job = newJob(n)
	n.done = make(chan struct{})
	go func() {
		err := n.dl.Fill(n.s.ctx, n.job, task.Request{Digest: n.s.digest, UpstreamOnly: n.s.cfg.Selector == Direct})
		n.mu.Lock()
		n.err = err
		n.mu.Unlock()
		close(n.done)
	}()
	return n.job
}

// Progress and Delegate are the node's downloads (swarm.Downloads) for its
// server: its downloader, built after it.
func (n *node) Progress(d digest.Digest) ([]int, bool, bool) { return n.dl.Progress(d) }
func (n *node) Delegate(d digest.Digest, pieces []int, reader string) {
	n.dl.Delegate(d, pieces, reader)
}
func (n *node) FollowBack(d digest.Digest, child membership.Member) { n.dl.FollowBack(d, child) }

// simOwner starts the node's download for a registering node, as the task
// manager does for the owner.
type simOwner struct{ n *node }

func (o simOwner) OpenForPeers(context.Context, task.Request) (swarm.Owned, error) {
	return o.n.open(), nil
}

// noBlobs: no node holds the blob complete before the pull.
type noBlobs struct{}

func (noBlobs) Stat(digest.Digest) (int64, error) { return 0, blobstore.ErrNotFound }
func (noBlobs) Get(context.Context, digest.Digest) (*blobstore.Blob, error) {
	return nil, blobstore.ErrNotFound
}

// simUploads are upload capacities as a node knows them: its own from its
// meter, the others' from the states they publish (none for itself: a
// node's syncer follows other nodes).
type simUploads struct{ n *node }

func (u simUploads) OwnUpload() float64 { return float64(u.n.meter.State().MaxTxBps) }
func (u simUploads) UploadOf(id string) float64 {
	if id == u.n.id {
		return 0
	}
	st, ok := u.n.s.state(id)
	if !ok {
		return 0
	}
	return float64(st.GetMaxTxBandwidth())
}

// simAddr is a node's address on the simulated network.
type simAddr string

func (a simAddr) Network() string { return "sim" }
func (a simAddr) String() string  { return string(a) }

// transport is the simulated network as swarm.Transport: one node's calls
// to the others, each one latency away.
type transport struct{ n *node }

// Register is the owner's real tracker side (swarm.Server.Register), over
// the simulated network: the request and its answer each one latency away.
func (t transport) Register(ctx context.Context, addr string, req *pb.RegisterRequest) (*pb.RegisterResponse, error) {
	o := t.n.s.node(addr)
	if err := sleep(ctx, t.n.s.cfg.Latency); err != nil {
		return nil, err
	}
	resp, err := o.server.Register(t.n.callerContext(ctx), req)
	if err != nil {
		return nil, err
	}
	return resp, sleep(ctx, t.n.s.cfg.Latency)
}

// callerContext is ctx as a peer server sees a request from n: no
// certificate (an insecure peer port), so the id it claims.
func (n *node) callerContext(ctx context.Context) context.Context {
	return grpcpeer.NewContext(ctx, &grpcpeer.Peer{Addr: simAddr(n.id)})
}

// Watch follows the pieces of the node at addr: what it holds now, then
// each new piece, each one latency after it happened, as WatchPieces does.
func (t transport) Watch(ctx context.Context, addr string, _ digest.Digest, _ string, fn func(*pb.PieceUpdate)) error {
	p := t.n.s.node(addr)
	w := &watcher{child: t.n, fn: fn}
	p.mu.Lock()
	p.watchers = append(p.watchers, w)
	var have []int
	if p.job != nil {
		have = p.job.held()
	}
	p.mu.Unlock()
	// As the peer server's WatchPieces: the watched node hears of its child.
	p.server.Watching(t.n.callerContext(ctx), p.s.digest, t.n.id)
	t.n.following.Add(1)
	defer t.n.following.Add(-1)
	first := p.update(have)
	time.AfterFunc(t.n.s.cfg.Latency, func() { w.push(first) })
	<-ctx.Done()
	p.unwatch(w)
	w.close()
	return ctx.Err()
}

// Parent is the node at addr as a parent of this one.
func (t transport) Parent(id, _ string, _ digest.Digest) collector.Parent {
	return &peerParent{s: t.n.s, from: t.n.s.node(id), to: t.n}
}

func (n *node) unwatch(w *watcher) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.watchers = slices.DeleteFunc(n.watchers, func(x *watcher) bool { return x == w })
}

// update is a piece update naming pieces (checksums are not simulated) and
// what this node fetches now.
func (n *node) update(pieces []int) *pb.PieceUpdate {
	up := &pb.PieceUpdate{Digest: n.s.digest.String(), Size: n.s.plan.Size, PieceSize: n.s.plan.PieceSize}
	for _, i := range pieces {
		up.Pieces = append(up.Pieces, &pb.Piece{Index: uint32(i)})
	}
	fetching, _, _ := n.dl.Progress(n.s.digest)
	for _, i := range fetching {
		up.Fetching = append(up.Fetching, uint32(i))
	}
	return up
}

// announce tells n's watchers, one latency later, that piece i is done.
func (n *node) announce(i int) {
	n.mu.Lock()
	watchers := slices.Clone(n.watchers)
	n.mu.Unlock()
	if len(watchers) == 0 {
		return
	}
	up := n.update([]int{i})
	time.AfterFunc(n.s.cfg.Latency, func() {
		for _, w := range watchers {
			w.push(up)
		}
	})
}

// Size and Pieces are the job as the owner's server sees it (swarm.Owned);
// checksums are not simulated.
func (j *job) Size() int64                { return j.n.s.plan.Size }
func (j *job) Pieces() ([]bool, []uint32) { return j.done(), nil }

// job is a node's copy of the blob: which pieces it holds.
type job struct {
	n       *node
	reading atomic.Bool
	mu      sync.Mutex
	have    []bool
	next    int // first missing piece
	// got is have for Has, written with it and read without the lock:
	// the collector asks for every piece a parent announces.
	got []atomic.Bool
}

func newJob(n *node) *job {
	count := n.s.plan.Count()
	return &job{n: n, have: make([]bool, count), got: make([]atomic.Bool, count)}
}

func (j *job) Digest() digest.Digest { return j.n.s.digest }
func (j *job) Plan() piece.Plan      { return j.n.s.plan }
func (j *job) Has(i int) bool        { return j.got[i].Load() }

func (j *job) Next() int {
	if !j.reading.Load() {
		return -1
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.next >= len(j.have) {
		return -1
	}
	return j.next
}

func (j *job) Put(i int, r io.Reader, _ string, _ collector.Expect) error {
	// The body stands for the bytes and holds none.
	if _, err := io.Copy(io.Discard, r); err != nil {
		return fmt.Errorf("sim: piece %d: %w", i, err)
	}
	j.mu.Lock()
	j.have[i] = true
	j.got[i].Store(true)
	for j.next < len(j.have) && j.have[j.next] {
		j.next++
	}
	j.mu.Unlock()
	j.n.announce(i)
	return nil
}

// done is, per piece, whether the node holds it.
func (j *job) done() []bool {
	j.mu.Lock()
	defer j.mu.Unlock()
	return slices.Clone(j.have)
}

// held lists the pieces the node holds.
func (j *job) held() []int {
	j.mu.Lock()
	defer j.mu.Unlock()
	var out []int
	for i, ok := range j.have {
		if ok {
			out = append(out, i)
		}
	}
	return out
}

// body stands for a piece's bytes: the simulation moves no data.
type body struct{}

func (*body) Read([]byte) (int, error) { return 0, io.EOF }
func (*body) Close() error             { return nil }

// upstream is the registry as a node's blob source.
type upstream struct {
	s *simulation
	n *node
}

func (u upstream) Blob(ctx context.Context, _, _ string, _ digest.Digest, _, size int64, _ http.Header) (io.ReadCloser, bool, error) {
	if err := sleep(ctx, 2*u.s.cfg.Latency); err != nil {
		return nil, false, err
	}
	if err := u.s.net.transfer(ctx, u.s.origin, u.n.h, size); err != nil {
		return nil, false, err
	}
	for at := int64(time.Since(u.s.start)); ; {
		last := u.s.lastOrigin.Load()
		if at <= last || u.s.lastOrigin.CompareAndSwap(last, at) {
			break
		}
	}
	return &body{}, false, nil
}

// peerParent is node from as a parent of node to.
type peerParent struct {
	s        *simulation
	from, to *node
}

func (p *peerParent) ID() string { return p.from.id }

// errNoPiece is a request for a piece the parent does not hold.
var errNoPiece = errors.New("sim: parent does not hold the piece")

func (p *peerParent) Fetch(ctx context.Context, i int, _, size int64) (_ io.ReadCloser, err error) {
	// A request and its answer, a refusal too, take a round trip. The
	// parent decides at once rather than one latency later: one timer per
	// request, where refusals outnumber pieces.
	admitted, err := p.admit(i)
	if err := errors.Join(err, sleep(ctx, 2*p.s.cfg.Latency)); err != nil {
		if admitted != nil {
			admitted(false)
		}
		return nil, err
	}
	defer func() { admitted(err == nil) }()
	if err := p.s.net.transfer(ctx, p.from.h, p.to.h, size); err != nil {
		return nil, err
	}
	return &body{}, nil
}

// admit is the parent's peer server deciding whether to send piece i now.
func (p *peerParent) admit(i int) (func(sent bool), error) {
	p.from.mu.Lock()
	j := p.from.job
	p.from.mu.Unlock()
	if j == nil || !j.Has(i) {
		return nil, errNoPiece
	}
	// As the peer server, from a snapshot of what the node holds: read in
	// place, under the job's lock, where a copy for every request cost
	// more than the ledger's decision.
	_, seeding, _ := p.from.dl.Progress(p.s.digest)
	j.mu.Lock()
	snap := peer.Snapshot{Seeding: seeding, Done: j.have}
	admitted, err := peer.Admission{Meter: p.from.meter, Ledger: p.from.ledger}.Admit(p.s.digest, i, p.s.plan.Count(), snap.Offer(), seeding)
	j.mu.Unlock()
	switch {
	case errors.Is(err, hoststate.ErrBusy):
		p.s.refusedBy(p.from, true)
		return nil, collector.ErrBusy
	case errors.Is(err, peer.ErrSentElsewhere):
		p.s.refusedBy(p.from, false)
		// As the peer server's 409 and the transfer pool's reading of it.
		return nil, &collector.ElsewhereError{Offered: peer.Offered(err)}
	}
	return admitted, err
}

// refusedBy counts a piece request parent refused, busy: at its upload
// limit.
func (s *simulation) refusedBy(parent *node, busy bool) {
	s.refused.Add(1)
	if busy {
		s.refusedBusy.Add(1)
	}
	if parent.id == s.owner {
		s.ownerRefused.Add(1)
	}
}

func sleep(ctx context.Context, d time.Duration) error {
	// Every sleep here is a latency, a few milliseconds: a cancelled
	// request returns at its end. time.Sleep parks on the goroutine's own
	// timer, where a timer and a select cost a cluster's requests twice.
	time.Sleep(d)
	return ctx.Err()
}

// Quantile returns the q-quantile (0..1) of ds, nearest rank.
func Quantile(ds []time.Duration, q float64) time.Duration {
	s := make([]float64, len(ds))
	for i, d := range ds {
		s[i] = float64(d)
	}
	sort.Float64s(s)
	return time.Duration(report.Quantile(s, q))
}

// trace writes the cluster's state at simulated time at: how many pieces
// the nodes hold, how many nodes hold each piece, how many parents each node
// follows and how many children follow it, how much of its links each node
// uses now, the flows, refusals and upstream bytes so far, the nodes furthest
// behind, the unfinished nodes whose upload idles (their children that lack
// a piece they hold, those children's download use), each node reading from
// the upstream now (its upstream flows and what else shares its download),
// and each node that alone holds pieces (a piece held by one node spreads
// only through the nodes following it).
func (s *simulation) trace(w io.Writer, at time.Duration) {
	holders := make([]int, s.plan.Count())
	held := make([][]bool, len(s.nodes))
	var counts, parents, children []int
	kids := make([][]*node, len(s.nodes))
	fetching := make([][]int, len(s.nodes)) // per node: the pieces in flight
	for k, n := range s.nodes {
		fetching[k], _, _ = n.dl.Progress(s.digest)
		n.mu.Lock()
		j := n.job
		children = append(children, len(n.watchers))
		for _, w := range n.watchers {
			kids[k] = append(kids[k], w.child)
		}
		n.mu.Unlock()
		parents = append(parents, int(n.following.Load()))
		c := 0
		if j != nil {
			held[k] = j.done()
			for i, ok := range held[k] {
				if ok {
					holders[i]++
					c++
				}
			}
		}
		counts = append(counts, c)
	}
	s.net.mu.Lock()
	flows := 0
	var upUse, downUse []int // percent of the link in use now
	for _, n := range s.nodes {
		flows += len(n.h.downs)
		upUse = append(upUse, int(100*n.h.upRate/n.h.up))
		downUse = append(downUse, int(100*n.h.downRate/n.h.down))
	}
	origin := s.origin.sent
	s.net.mu.Unlock()
	fmt.Fprintf(w, "%v: pieces held %s; holders a piece %s; parents %s; children %s; upload %% %s; download %% %s; %d flows, %d refusals (%d by the owner), upstream %.0f MB\n",
		at, quantiles(counts), quantiles(holders), quantiles(parents), quantiles(children), quantiles(upUse), quantiles(downUse), flows, s.refused.Load(), s.ownerRefused.Load(), origin/1e6)
	// The unfinished nodes whose upload idles (a third or less in use): do
	// their children lack pieces they hold and not fetch them elsewhere,
	// and have those children download room to ask?
	index := make(map[*node]int, len(s.nodes))
	for k, n := range s.nodes {
		index[n] = k
	}
	var idle, idleKids, idleWanting, idleHeld, busy, busyKids, busyWanting int
	var wanting, wantingDown []int // children lacking one; their download use
	for k := range s.nodes {
		if counts[k] == 0 || counts[k] == s.plan.Count() {
			continue
		}
		want := 0 // children lacking a piece k holds, not fetching it now
		var down []int
		for _, c := range kids[k] {
			ch, fetch := held[index[c]], fetching[index[c]]
			for i, ok := range held[k] {
				if ok && (ch == nil || !ch[i]) && !slices.Contains(fetch, i) {
					want++
					down = append(down, downUse[index[c]])
					break
				}
			}
		}
		if upUse[k] <= 33 {
			wantingDown = append(wantingDown, down...)
			idle++
			idleKids += len(kids[k])
			idleWanting += want
			idleHeld += counts[k]
			wanting = append(wanting, want)
		} else {
			busy++
			busyKids += len(kids[k])
			busyWanting += want
		}
	}
	if idle > 0 {
		fmt.Fprintf(w, "  idle uploads: %d unfinished nodes at 33%% or less, holding %d pieces, %d children, %d of them lacking a piece it holds and not fetching it (mean); children lacking one %s, their download %% %s; the busy ones: %d children, %d lacking (mean)\n",
			idle, idleHeld/idle, idleKids/idle, idleWanting/idle, quantiles(wanting), quantiles(wantingDown), busyKids/max(busy, 1), busyWanting/max(busy, 1))
	}
	// The three nodes furthest behind: what they download now, and from
	// how many parents, and how busy those parents' uploads are.
	order := make([]int, len(s.nodes))
	for k := range order {
		order[k] = k
	}
	slices.SortFunc(order, func(a, b int) int { return counts[a] - counts[b] })
	for _, k := range order[:min(3, len(order))] {
		n := s.nodes[k]
		s.net.mu.Lock()
		var senders []string // each sender's upload use and uploads
		for _, f := range n.h.downs {
			senders = append(senders, fmt.Sprintf("%d%%/%d", int(100*f.src.upRate/f.src.up), len(f.src.ups)))
		}
		down := int(100 * n.h.downRate / n.h.down)
		s.net.mu.Unlock()
		fmt.Fprintf(w, "  behind: %s holds %d pieces, follows %d parents, downloads %d%% in %d flows; senders' upload use/uploads: %v\n",
			n.id, counts[k], n.following.Load(), down, len(senders), senders)
	}
	// The upstream's readers: how much of the upstream each takes now, and
	// what else shares its download.
	s.net.mu.Lock()
	for _, n := range s.nodes {
		ups, rate := 0, 0.0
		for _, f := range n.h.downs {
			if f.src == s.origin {
				ups++
				rate += f.rate
			}
		}
		if ups > 0 {
			fmt.Fprintf(w, "  reading: %s, %d upstream flows at %.0f MB/s in all; downloads %d%% in %d flows\n",
				n.id, ups, rate/1e6, int(100*n.h.downRate/n.h.down), len(n.h.downs))
		}
	}
	s.net.mu.Unlock()
	for k, n := range s.nodes {
		sole := 0
		for i, ok := range held[k] {
			if ok && holders[i] == 1 {
				sole++
			}
		}
		if sole > 0 {
			fmt.Fprintf(w, "  %s alone holds %d pieces; owner %v, %d children\n", n.id, sole, n.id == s.owner, children[k])
		}
	}
}

// quantiles is the min, p10, p50, p90 and max of xs.
func quantiles(xs []int) string {
	if len(xs) == 0 {
		return "[none]"
	}
	xs = slices.Clone(xs)
	slices.Sort(xs)
	return fmt.Sprintf("[min %d p10 %d p50 %d p90 %d max %d]", xs[0], xs[len(xs)/10], xs[len(xs)/2], xs[len(xs)*9/10], xs[len(xs)-1])
}
