// Package swarm runs a blob's download across the cluster: it finds the
// digest's owner by rendezvous hashing over the live members, registers with
// it to learn which peers have pieces, follows those peers' piece metadata
// and host state, and feeds them as parents to the collector. Only the owner
// (or, when it cannot be reached, the next in rank, and at last anyone) may
// go to the upstream. It also serves this node's side: the tracker for the
// digests it owns, and what it has of each blob for its peers.
package swarm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"sort"
	"sync"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
	"github.com/hashicorp/golang-lru/v2/expirable"
	"github.com/opencontainers/go-digest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/registry-proxy/registry-proxy/blobstore"
	"github.com/registry-proxy/registry-proxy/p2p/collector"
	"github.com/registry-proxy/registry-proxy/p2p/membership"
	"github.com/registry-proxy/registry-proxy/p2p/owner"
	"github.com/registry-proxy/registry-proxy/p2p/pb"
	"github.com/registry-proxy/registry-proxy/p2p/peer"
	"github.com/registry-proxy/registry-proxy/p2p/tracker"
	"github.com/registry-proxy/registry-proxy/p2p/transfer"
	"github.com/registry-proxy/registry-proxy/p2p/trust"
	"github.com/registry-proxy/registry-proxy/piece"
	"github.com/registry-proxy/registry-proxy/proxy/upstream"
	"github.com/registry-proxy/registry-proxy/task"
)

// Options configure a Swarm.
type Options struct {
	Self      membership.Member
	Members   func() []membership.Member
	Pool      *transfer.Pool
	Collector *collector.Collector
	// Follow registers a parent with the host-state syncer; may be nil.
	Follow   func(id, addr string)
	Store    *blobstore.Store
	Upstream collector.BlobSource
	// PeerUpstream is the upstream with this node's own credentials, for
	// fetches on peers' behalf (task.Request.ForPeers).
	PeerUpstream collector.BlobSource
	// Registries checks a registry and repository a peer names before this
	// node fetches anything for it.
	Registries RegistryChecker
	// MaxPeers bounds the peer list an owner hands out.
	MaxPeers int
	// Refresh is how often a download re-checks its owner and peer list.
	Refresh time.Duration
	Logger  *slog.Logger
}

// RegistryChecker says whether this node may fetch a repository of a
// registry; *upstream.Client is one.
type RegistryChecker interface {
	CheckRepository(registry, repo string) error
}

// Swarm coordinates downloads with the other nodes.
type Swarm struct {
	pb.UnimplementedTrackerServer
	opts  Options
	log   *slog.Logger
	tasks *task.Manager

	tracker *tracker.Tracker
	// private remembers digests this node could not fetch with its own
	// credentials, so registering nodes fetch them themselves.
	private *expirable.LRU[digest.Digest, struct{}]
	// crcs holds stored blobs' piece checksums, for peers watching them.
	crcs *lru.Cache[digest.Digest, []uint32]

	mu   sync.Mutex
	runs map[digest.Digest]*collector.Run
}

// New returns a swarm; Bind gives it the task manager.
func New(opts Options) *Swarm {
	if opts.MaxPeers <= 0 {
		opts.MaxPeers = 32
	}
	if opts.Refresh <= 0 {
		opts.Refresh = time.Second
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	crcs, _ := lru.New[digest.Digest, []uint32](1024)
	return &Swarm{
		opts:    opts,
		log:     opts.Logger.With("component", "swarm"),
		runs:    map[digest.Digest]*collector.Run{},
		tracker: tracker.New(nil),
		private: expirable.NewLRU[digest.Digest, struct{}](4096, nil, time.Minute),
		crcs:    crcs,
	}
}

// Bind sets the task manager (which is built with Fill).
func (s *Swarm) Bind(tasks *task.Manager) { s.tasks = tasks }

// Fill collects job's pieces from the cluster; it is the task manager's Fill.
func (s *Swarm) Fill(ctx context.Context, job collector.Job, req task.Request) error {
	d := req.Digest
	run := s.opts.Collector.NewRun(job)
	src := s.opts.Upstream
	if req.ForPeers && s.opts.PeerUpstream != nil {
		src = s.opts.PeerUpstream
	}
	run.SetUpstream(collector.NewUpstreamParent(src, req.Registry, req.Repo, d, req.Header), req.UpstreamOnly)
	s.mu.Lock()
	s.runs[d] = run
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		if s.runs[d] == run {
			delete(s.runs, d)
		}
		s.mu.Unlock()
	}()
	if req.UpstreamOnly {
		return run.Run(ctx)
	}

	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	var wmu sync.Mutex
	watching := map[string]bool{}
	// pending holds parents whose first update has not arrived yet.
	pending := map[string]bool{}
	pendingDone := make(chan struct{}, 1)
	plan := job.Plan()
	addParent := func(id, addr string) {
		if id == s.opts.Self.ID || addr == "" {
			return
		}
		wmu.Lock()
		// Each refresh names up to MaxPeers new registrants; following
		// them all would grow with the cluster (every announcement of
		// every peer reaches every node). The owner comes first.
		if watching[id] || len(watching) > s.opts.MaxPeers {
			wmu.Unlock()
			return
		}
		watching[id] = true
		pending[id] = true
		wmu.Unlock()
		arrived := func() {
			wmu.Lock()
			if pending[id] {
				delete(pending, id)
				if len(pending) == 0 {
					select {
					case pendingDone <- struct{}{}:
					default:
					}
				}
			}
			wmu.Unlock()
		}
		run.AddParent(s.opts.Pool.Parent(id, addr, d))
		if s.opts.Follow != nil {
			s.opts.Follow(id, addr)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer arrived()
			wctx, wcancel := context.WithCancel(ctx)
			defer wcancel()
			ignored := false
			err := s.opts.Pool.Watch(wctx, addr, d, s.opts.Self.ID, func(up *pb.PieceUpdate) {
				defer arrived()
				if ignored {
					return
				}
				a, err := parseUpdate(up, d, plan)
				if err != nil {
					// This peer alone is ignored for the rest of the download:
					// it stays in watching, so it is not added again.
					s.log.Warn("ignoring a peer's piece updates", "peer", id, "digest", d, "err", err)
					ignored = true
					run.RemoveParent(id)
					wcancel()
					return
				}
				if a.complete {
					run.AnnounceComplete(id, a.has)
					return
				}
				run.Announce(id, a.has, a.fetching)
			})
			if ctx.Err() != nil || ignored {
				return
			}
			if err != nil {
				s.log.Debug("piece stream ended", "peer", id, "digest", d, "err", err)
				run.RemoveParent(id)
			}
			wmu.Lock()
			delete(watching, id)
			wmu.Unlock()
		}()
	}

	coordinate := func() {
		members := s.opts.Members()
		addrs := map[string]string{}
		ids := make([]string, 0, len(members))
		for _, m := range members {
			addrs[m.ID] = m.Addr
			ids = append(ids, m.ID)
		}
		for _, id := range owner.Rank(d.String(), ids) {
			if id == s.opts.Self.ID {
				// This node owns the digest now: it goes upstream, and
				// takes pieces from whoever registered.
				run.SetAuthority("")
				run.AllowUpstream(true)
				for _, p := range s.tracker.Peers(d.String(), "", s.opts.MaxPeers) {
					addParent(p.ID, p.Addr)
				}
				return
			}
			rctx, rcancel := context.WithTimeout(ctx, 3*time.Second)
			resp, err := s.opts.Pool.Register(rctx, addrs[id], &pb.RegisterRequest{
				Digest: d.String(), HostId: s.opts.Self.ID, Addr: s.opts.Self.Addr,
				Registry: req.Registry, Repository: req.Repo,
			})
			rcancel()
			if err != nil {
				if ctx.Err() != nil {
					return
				}
				s.log.Warn("owner did not answer; trying the next in rank", "owner", id, "digest", d, "err", err)
				continue
			}
			// The owner cannot fetch a private blob: the first node to ask
			// fetches it with its client's credentials and seeds it.
			run.AllowUpstream(resp.GetFetchYourself() && len(resp.GetPeers()) == 0)
			// The owner's piece checksums, read from the upstream, are the
			// ones every piece is checked against.
			run.SetAuthority(id)
			addParent(id, addrs[id])
			for _, p := range resp.GetPeers() {
				addParent(p.GetId(), p.GetAddr())
			}
			return
		}
		s.log.Warn("no owner answered; fetching from upstream", "digest", d)
		run.AllowUpstream(true)
	}

	coordinate()
	// Let the parents found so far announce what they have before the first
	// pieces are chosen, or the first announcer takes every worker.
	wmu.Lock()
	waiting := len(pending) > 0
	wmu.Unlock()
	if waiting {
		select {
		case <-pendingDone:
		case <-time.After(500 * time.Millisecond):
		case <-ctx.Done():
		}
	}
	errc := make(chan error, 1)
	go func() { errc <- run.Run(ctx) }()
	t := time.NewTicker(s.opts.Refresh)
	defer t.Stop()
	for {
		select {
		case err := <-errc:
			s.logPicks(d, run)
			return err
		case <-t.C:
			coordinate()
		}
	}
}

// announcement is a parent's piece update, checked.
type announcement struct {
	has      map[int]uint32
	fetching []int
	complete bool
}

// parseUpdate checks a piece update from a parent against this node's plan
// of the blob: the same digest and plan, piece indices within it, no more
// entries than pieces.
func parseUpdate(up *pb.PieceUpdate, d digest.Digest, plan piece.Plan) (announcement, error) {
	if up.GetDigest() != d.String() {
		return announcement{}, fmt.Errorf("update for %q, not %s", up.GetDigest(), d)
	}
	if up.GetSize() != plan.Size || up.GetPieceSize() != plan.PieceSize {
		return announcement{}, fmt.Errorf("piece plan %d/%d differs from %d/%d", up.GetSize(), up.GetPieceSize(), plan.Size, plan.PieceSize)
	}
	n := plan.Count()
	if len(up.GetPieces()) > n || len(up.GetFetching()) > n {
		return announcement{}, fmt.Errorf("%d pieces and %d fetching announced of %d", len(up.GetPieces()), len(up.GetFetching()), n)
	}
	a := announcement{complete: up.GetComplete(), has: make(map[int]uint32, len(up.GetPieces())), fetching: make([]int, 0, len(up.GetFetching()))}
	for _, p := range up.GetPieces() {
		if int64(p.GetIndex()) >= int64(n) {
			return announcement{}, fmt.Errorf("piece %d of %d", p.GetIndex(), n)
		}
		a.has[int(p.GetIndex())] = p.GetChecksum()
	}
	for _, f := range up.GetFetching() {
		if int64(f) >= int64(n) {
			return announcement{}, fmt.Errorf("fetching piece %d of %d", f, n)
		}
		a.fetching = append(a.fetching, int(f))
	}
	if a.complete && len(a.has) != n {
		return announcement{}, fmt.Errorf("complete, with checksums of %d of %d pieces", len(a.has), n)
	}
	return a, nil
}

func (s *Swarm) logPicks(d digest.Digest, run *collector.Run) {
	picks := run.Picks()
	attrs := []any{"digest", d}
	keys := make([]string, 0, len(picks))
	for k := range picks {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		attrs = append(attrs, "pieces_from_"+k, picks[k])
	}
	for k, w := range run.Weights() {
		attrs = append(attrs, "weight_"+k, w)
	}
	s.log.Info("pieces by parent", attrs...)
}

// Register implements pb.TrackerServer: a node fetching a digest this node
// owns. The owner starts fetching the blob itself if no download runs here,
// with its own credentials. The registering node is recorded under the id
// its certificate names and the address gossip knows for it, nothing it
// merely claims.
func (s *Swarm) Register(ctx context.Context, req *pb.RegisterRequest) (*pb.RegisterResponse, error) {
	d, err := digest.Parse(req.GetDigest())
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "digest: %v", err)
	}
	who, err := s.caller(ctx, req.GetHostId())
	if err != nil {
		return nil, err
	}
	if s.opts.Registries != nil {
		if err := s.opts.Registries.CheckRepository(req.GetRegistry(), req.GetRepository()); err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "%v", err)
		}
	}
	resp := &pb.RegisterResponse{}
	for _, p := range s.tracker.Peers(d.String(), who.ID, s.opts.MaxPeers) {
		resp.Peers = append(resp.Peers, &pb.PeerRef{Id: p.ID, Addr: p.Addr})
	}
	s.tracker.Add(d.String(), tracker.Peer{ID: who.ID, Addr: who.Addr, Seen: time.Now()})

	if size, err := s.opts.Store.Stat(d); err == nil {
		resp.Size = size
		return resp, nil
	}
	if s.tasks == nil {
		return resp, nil
	}
	if s.private.Contains(d) {
		resp.FetchYourself = true
		return resp, nil
	}
	t, err := s.tasks.Open(ctx, task.Request{Digest: d, Registry: req.GetRegistry(), Repo: req.GetRepository(), ForPeers: true})
	var se *upstream.StatusError
	switch {
	case errors.Is(err, task.ErrComplete):
		resp.Size, _ = s.opts.Store.Stat(d)
	case errors.As(err, &se) && (se.Code == http.StatusUnauthorized || se.Code == http.StatusForbidden || se.Code == http.StatusNotFound):
		// Private, or not visible to this node's credentials: the node whose
		// client asked fetches it with that client's credentials.
		s.private.Add(d, struct{}{})
		s.log.Info("owner cannot fetch with its own credentials; the registering node fetches it", "digest", d, "registry", req.GetRegistry(), "repo", req.GetRepository(), "status", se.Code, "node", who.ID)
		resp.FetchYourself = true
	case errors.Is(err, task.ErrTooLarge):
		return nil, status.Errorf(codes.InvalidArgument, "%v", err)
	case err != nil:
		return nil, status.Errorf(codes.Unavailable, "owner cannot fetch %s: %v", d, err)
	default:
		resp.Size = t.Size()
	}
	return resp, nil
}

// caller is the member behind a request: the id it authenticated with (on
// an insecure peer port, the id it claims) must be a live member, and the
// request must come from that member's address.
func (s *Swarm) caller(ctx context.Context, claimed string) (membership.Member, error) {
	p, err := trust.Caller(ctx, claimed)
	switch {
	case errors.Is(err, trust.ErrNotSelf):
		return membership.Member{}, status.Error(codes.PermissionDenied, err.Error())
	case err != nil:
		return membership.Member{}, status.Error(codes.Unauthenticated, err.Error())
	}
	id := p.ID
	for _, m := range s.opts.Members() {
		if m.ID != id {
			continue
		}
		host, _, err := net.SplitHostPort(m.Addr)
		if ip := net.ParseIP(host); err == nil && ip != nil && p.IP != nil && !ip.Equal(p.IP) {
			return membership.Member{}, status.Errorf(codes.PermissionDenied, "node %q is a member at %s, the request came from %s", id, m.Addr, p.IP)
		}
		return m, nil
	}
	return membership.Member{}, status.Errorf(codes.PermissionDenied, "node %q is not a member", id)
}

// Snapshot implements peer.Source.
func (s *Swarm) Snapshot(d digest.Digest) (peer.Snapshot, <-chan struct{}, bool) {
	if size, err := s.opts.Store.Stat(d); err == nil {
		plan := piece.PlanFor(size)
		crcs, err := s.pieceChecksums(d, plan)
		if err != nil {
			s.log.Warn("checksumming a stored blob's pieces", "digest", d, "err", err)
			return peer.Snapshot{}, nil, false
		}
		done := make([]bool, plan.Count())
		for i := range done {
			done[i] = true
		}
		return peer.Snapshot{Plan: plan, Done: done, CRC: crcs, Complete: true}, nil, true
	}
	if s.tasks == nil {
		return peer.Snapshot{}, nil, false
	}
	t, ok := s.tasks.Lookup(d)
	if !ok {
		return peer.Snapshot{}, nil, false
	}
	t.Touch() // a peer watches it: keep it going with no reader here
	ch := t.Changed()
	done, crc := t.Pieces()
	snap := peer.Snapshot{Plan: t.Plan(), Done: done, CRC: crc}
	s.mu.Lock()
	if run := s.runs[d]; run != nil {
		snap.Fetching = run.InFlight()
		snap.Seeding = run.UpstreamAllowed()
	}
	s.mu.Unlock()
	return snap, ch, true
}

// pieceChecksums are the piece checksums of a stored blob, computed once
// (one read of the blob) and remembered.
func (s *Swarm) pieceChecksums(d digest.Digest, plan piece.Plan) ([]uint32, error) {
	if c, ok := s.crcs.Get(d); ok && len(c) == plan.Count() {
		return c, nil
	}
	b, err := s.opts.Store.Get(d)
	if err != nil {
		return nil, err
	}
	defer b.Close()
	crcs := make([]uint32, plan.Count())
	buf := make([]byte, 1<<20)
	for i := range crcs {
		off, n := plan.Range(i)
		h := piece.NewChecksum()
		if _, err := io.CopyBuffer(h, io.NewSectionReader(b.File, off, n), buf); err != nil {
			return nil, fmt.Errorf("swarm: checksum piece %d of %s: %w", i, d, err)
		}
		crcs[i] = h.Sum32()
	}
	s.crcs.Add(d, crcs)
	return crcs, nil
}

// OpenPiece implements peer.Source.
func (s *Swarm) OpenPiece(d digest.Digest, i int) (*os.File, int64, int64, func(), error) {
	if b, err := s.opts.Store.Get(d); err == nil {
		plan := piece.PlanFor(b.Size)
		if i >= plan.Count() {
			b.Close()
			return nil, 0, 0, nil, peer.ErrNoPiece
		}
		off, n := plan.Range(i)
		return b.File, off, n, func() { b.Close() }, nil
	}
	if s.tasks == nil {
		return nil, 0, 0, nil, peer.ErrNoPiece
	}
	t, ok := s.tasks.Lookup(d)
	if !ok || i >= t.Plan().Count() || !t.Has(i) {
		return nil, 0, 0, nil, peer.ErrNoPiece
	}
	t.Touch()
	f, err := t.OpenFile()
	if err != nil {
		return nil, 0, 0, nil, fmt.Errorf("swarm: open %s: %w", d, err)
	}
	off, n := t.Plan().Range(i)
	return f, off, n, func() { f.Close() }, nil
}
