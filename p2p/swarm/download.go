package swarm

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/p2p/collector"
	"github.com/registry-proxy/registry-proxy/p2p/membership"
	"github.com/registry-proxy/registry-proxy/p2p/owner"
	"github.com/registry-proxy/registry-proxy/p2p/pb"
	"github.com/registry-proxy/registry-proxy/p2p/tracker"
	"github.com/registry-proxy/registry-proxy/piece"
	"github.com/registry-proxy/registry-proxy/task"
)

// DownloaderOptions configure a Downloader.
type DownloaderOptions struct {
	Self      membership.Member
	Members   Members
	Transport Transport
	Collector *collector.Collector
	// Follower follows parents' host state; may be nil.
	Follower Follower
	// Tracker holds the registrations of the digests this node owns (the
	// Server's): as owner, a download takes pieces from them.
	Tracker  *tracker.Tracker
	Upstream collector.BlobSource
	// PeerUpstream is the upstream with this node's own credentials, for
	// fetches on peers' behalf and for clients in access mode "node"
	// (task.Request.NodeAuth).
	PeerUpstream collector.BlobSource
	// MaxPeers bounds the parents one download follows.
	MaxPeers int
	// Refresh is how often a download re-checks its owner and peer list.
	Refresh time.Duration
	Logger  *slog.Logger
}

// Downloader fills this node's downloads from the cluster; it is the task
// manager's Filler.
type Downloader struct {
	opts DownloaderOptions
	log  *slog.Logger

	mu   sync.Mutex
	runs map[digest.Digest]*collector.Run
	// delegated is what this node, as owner, left to delegates.
	delegated map[digest.Digest]*delegates
	// children takes the members that follow a running download here to
	// its Fill, which follows them back.
	children map[digest.Digest]*childQueue
}

// maxQueuedChildren bounds the members a childQueue holds between two
// takes; more are dropped (at most maxFollowedBack are followed back).
const maxQueuedChildren = 1024

// maxFollowedBack is how many of the nodes that follow a download it
// follows back: half maxPeers (16 of the default 32), as many as a channel
// of 16 let through before the queue. Each parent followed is a stream of
// piece updates for the collector: with maxPeers followed back, 1,000
// simulated nodes took a fifth to a third more time for the same times to
// pull (docs/benchmarks/notebook.md).
func maxFollowedBack(maxPeers int) int { return max(1, maxPeers/2) }

// childQueue holds the members that began to follow a download, for its
// Fill to follow back. It drops none below maxQueuedChildren: a node's
// first children arrive together (a cluster registers within a second),
// and a bounded channel dropped all but the first 16 of them, so that the
// nodes that registered last, named to few, were followed back by none of
// their parents and their upload idled (docs/benchmarks/notebook.md).
type childQueue struct {
	mu    sync.Mutex
	list  []membership.Member
	ready chan struct{} // holds a token while list is not empty
}

func newChildQueue() *childQueue { return &childQueue{ready: make(chan struct{}, 1)} }

func (q *childQueue) put(m membership.Member) {
	q.mu.Lock()
	if len(q.list) < maxQueuedChildren {
		q.list = append(q.list, m)
	}
	q.mu.Unlock()
	select {
	case q.ready <- struct{}{}:
	default: // a token is there already
	}
}

// take returns the members queued since the last take.
func (q *childQueue) take() []membership.Member {
	q.mu.Lock()
	defer q.mu.Unlock()
	list := q.list
	q.list = nil
	return list
}

// delegates are the pieces of a blob an owner left to the nodes that read
// them from the upstream, and those nodes.
type delegates struct {
	pieces  []int
	readers []string
}

// NewDownloader returns a downloader.
func NewDownloader(opts DownloaderOptions) *Downloader {
	if opts.MaxPeers <= 0 {
		opts.MaxPeers = 32
	}
	if opts.Refresh <= 0 {
		opts.Refresh = time.Second
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Tracker == nil {
		opts.Tracker = tracker.New(nil)
	}
	return &Downloader{opts: opts, log: opts.Logger.With("component", "swarm"), runs: map[digest.Digest]*collector.Run{},
		delegated: map[digest.Digest]*delegates{}, children: map[digest.Digest]*childQueue{}}
}

// Delegate leaves pieces of d to the nodes that read them from the upstream
// as this owner's delegates (Server.Register): the download takes them from
// those peers, following reader whatever its parents.
func (s *Downloader) Delegate(d digest.Digest, pieces []int, reader string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	dg := s.delegated[d]
	if dg == nil {
		dg = &delegates{}
		s.delegated[d] = dg
	}
	dg.pieces = append(dg.pieces, pieces...)
	if !slices.Contains(dg.readers, reader) {
		dg.readers = append(dg.readers, reader)
	}
	if run := s.runs[d]; run != nil {
		run.DenyUpstream(pieces)
	}
}

// FollowBack has the running download of d follow child, a member that
// follows it: a node late to register is named to few later ones, and
// without it its upload would idle while its parents' ran full; and the
// nodes that follow a slow node, done before it, have upload to spare for
// it. Followed beyond MaxPeers, at most maxFollowedBack of them; none when no
// download of d runs or it has no room for more.
func (s *Downloader) FollowBack(d digest.Digest, child membership.Member) {
	s.mu.Lock()
	q := s.children[d]
	s.mu.Unlock()
	if q != nil {
		q.put(child)
	}
}

// Progress reports what the running download of d fetches now, and whether
// it may go to the upstream (it seeds the blob); ok is false when none runs.
func (s *Downloader) Progress(d digest.Digest) (fetching []int, seeding, ok bool) {
	s.mu.Lock()
	run := s.runs[d]
	s.mu.Unlock()
	if run == nil {
		return nil, false, false
	}
	return run.InFlight(), run.UpstreamAllowed(), true
}

// hedgeAfter is how long a download waits for a member's answer to its
// registration before asking the next in rank as well.
const hedgeAfter = 400 * time.Millisecond

// answerer is a Transport that knows which peer addresses ever answered
// (*transfer.Pool): the others are ranked as no owner.
type answerer interface {
	Answered(addrs []string) []bool
}

// answering are the members but those whose peer port never answered this
// node (Transport's answerer), this node kept.
func (o DownloaderOptions) answering(members []membership.Member) []membership.Member {
	a, ok := o.Transport.(answerer)
	if !ok {
		return members
	}
	return answering(o.Self.ID, a.Answered, members)
}

// AnsweringMembers are the live members whose peer port has answered this
// node, and this node: the members that rank as owners, for the announcer
// and the manifests as for downloads (a fake member's address never
// answers, so it is never asked first).
type AnsweringMembers struct {
	Self     string
	Live     Members
	Answerer interface{ Answered(addrs []string) []bool }
}

// Members implements Members.
func (a AnsweringMembers) Members() []membership.Member {
	return answering(a.Self, a.Answerer.Answered, a.Live.Members())
}

// answering are the members whose peer address answered says answered,
// and self: the one rule for ranking owners (Downloader and Server).
func answering(self string, answered func(addrs []string) []bool, members []membership.Member) []membership.Member {
	addrs := make([]string, 0, len(members))
	for _, m := range members {
		if m.ID != self {
			addrs = append(addrs, m.Addr)
		}
	}
	ok := answered(addrs)
	out := members[:0:0]
	k := 0
	for _, m := range members {
		if m.ID == self {
			out = append(out, m)
			continue
		}
		if ok[k] {
			out = append(out, m)
		}
		k++
	}
	return out
}

// maxReaders bounds the readers a download follows beyond MaxPeers.
const maxReaders = 16

// Fill collects job's pieces from the cluster; it implements task.Filler.
func (s *Downloader) Fill(ctx context.Context, job collector.Job, req task.Request) error {
	d := req.Digest
	run := s.opts.Collector.NewRun(job)
	src := s.opts.Upstream
	if req.NodeAuth() && s.opts.PeerUpstream != nil {
		src = s.opts.PeerUpstream
	}
	run.SetUpstream(s.opts.Collector.NewUpstreamParent(src, req.Registry, req.Repo, d, req.Header), req.UpstreamOnly)
	children := newChildQueue()
	s.mu.Lock()
	s.runs[d] = run
	if !req.UpstreamOnly {
		s.children[d] = children
	}
	if dg := s.delegated[d]; dg != nil && len(dg.pieces) > 0 && !req.UpstreamOnly {
		run.DenyUpstream(dg.pieces)
	}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		if s.runs[d] == run {
			delete(s.runs, d)
			delete(s.delegated, d)
		}
		if s.children[d] == children {
			delete(s.children, d)
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
	watching := map[string]parentKind{}
	followedBack := 0
	// pending holds parents whose first update has not arrived yet.
	pending := map[string]bool{}
	pendingDone := make(chan struct{}, 1)
	plan := job.Plan()
	addParent := func(id, addr string, kind parentKind) {
		if id == s.opts.Self.ID || addr == "" {
			return
		}
		wmu.Lock()
		// Each refresh names up to MaxPeers new registrants; following
		// them all would grow with the cluster (every announcement of
		// every peer reaches every node). The owner comes first.
		_, known := watching[id]
		if known || kind == ordinary && len(watching)-followedBack > s.opts.MaxPeers || kind == child && followedBack >= maxFollowedBack(s.opts.MaxPeers) {
			wmu.Unlock()
			return
		}
		watching[id] = kind
		if kind == child {
			followedBack++
		}
		pending[id] = true
		wmu.Unlock()
		// Only the first update (or the stream's end) counts: once, not
		// under the lock at every update.
		arrived := sync.OnceFunc(func() {
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
		})
		peer := run.AddParent(s.opts.Transport.Parent(id, addr, d))
		if s.opts.Follower != nil {
			s.opts.Follower.Follow(id, addr)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer arrived()
			wctx, wcancel := context.WithCancel(ctx)
			defer wcancel()
			ignored, complete := false, false
			err := s.opts.Transport.Watch(wctx, addr, d, s.opts.Self.ID, func(up *pb.PieceUpdate) {
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
					peer.Remove()
					wcancel()
					return
				}
				if a.complete {
					complete = true
					peer.AnnounceComplete(a.has)
					return
				}
				peer.Announce(a.has, a.fetching)
			})
			// A parent that said it is complete ends its stream with nothing
			// more to tell: it stays followed (a place among MaxPeers, not
			// watched again at each refresh).
			if ctx.Err() != nil || ignored || complete {
				return
			}
			if err != nil {
				s.log.Debug("piece stream ended", "peer", id, "digest", d, "err", err)
				peer.Remove()
			}
			wmu.Lock()
			if watching[id] == child {
				followedBack--
			}
			delete(watching, id)
			wmu.Unlock()
		}()
	}

	// The members' rank for d, kept while they stay the same: ranking
	// hashes every member, and every downloading node ranks again at each
	// refresh (1.2% of a 1,000-node simulation, growing with the square of
	// the nodes).
	var rankedIDs, rank []string
	coordinate := func() {
		members := s.opts.answering(s.opts.Members.Members())
		addrs := make(map[string]string, len(members))
		ids := make([]string, 0, len(members))
		for _, m := range members {
			addrs[m.ID] = m.Addr
			ids = append(ids, m.ID)
		}
		if !slices.Equal(ids, rankedIDs) {
			rankedIDs, rank = ids, owner.Rank(d.String(), ids)
		}
		// The members are asked in rank order; one that has not answered
		// within hedgeAfter is not waited for before asking the next, and
		// the first answer wins: an owner that does not answer costs
		// hedgeAfter, not the 3 s a registration may take.
		type answer struct {
			id   string
			resp *pb.RegisterResponse
			err  error
		}
		rctx, rcancel := context.WithTimeout(ctx, 3*time.Second)
		defer rcancel()
		answers := make(chan answer, len(rank))
		next, pending := 0, 0
		// askNext asks the next member at once; the hedge timer, after
		// hedgeAfter. (No zero-length timer: a fake one that has fired
		// before it is waited on crashes Go 1.26's runtime in a synctest
		// bubble, the simulator's.)
		askNext := make(chan struct{}, 1)
		askNext <- struct{}{}
		hedge := time.NewTimer(hedgeAfter)
		hedge.Stop()
		defer hedge.Stop()
		var got *answer
	asking:
		for {
			select {
			case <-askNext:
			case <-hedge.C:
			case a := <-answers:
				pending--
				if a.err == nil {
					got = &a
					break asking
				}
				if ctx.Err() != nil {
					return
				}
				s.log.Warn("owner did not answer; trying the next in rank", "owner", a.id, "digest", d, "err", a.err)
				hedge.Stop()
				select {
				case askNext <- struct{}{}:
				default:
				}
				continue
			case <-ctx.Done():
				return
			}
			if next == len(rank) {
				if pending == 0 {
					break asking
				}
				continue
			}
			id := rank[next]
			next++
			if id == s.opts.Self.ID {
				// This node owns the digest now: it goes upstream, unless a
				// live member announced it holds the blob, and takes pieces
				// from whoever registered or holds it.
				run.SetAuthority("")
				run.AllowUpstream(!slices.ContainsFunc(s.opts.Tracker.Holders(d.String()), func(h string) bool { _, live := addrs[h]; return live }))
				var readers []string
				s.mu.Lock()
				if dg := s.delegated[d]; dg != nil {
					readers = slices.Clone(dg.readers)
				}
				s.mu.Unlock()
				for _, r := range readers {
					addParent(r, addrs[r], reader)
				}
				for _, p := range s.opts.Tracker.Peers(d.String(), "", s.opts.MaxPeers) {
					addParent(p.ID, p.Addr, ordinary)
				}
				return
			}
			pending++
			go func() {
				resp, err := s.opts.Transport.Register(rctx, addrs[id], &pb.RegisterRequest{
					Digest: d.String(), HostId: s.opts.Self.ID, Addr: s.opts.Self.Addr,
					Registry: req.Registry, Repository: req.Repo,
				})
				answers <- answer{id, resp, err}
			}()
			hedge.Reset(hedgeAfter)
		}
		if got != nil {
			id, resp := got.id, got.resp
			// The owner cannot fetch a private blob: the first node to ask
			// fetches it with its client's credentials and seeds it.
			run.AllowUpstream(resp.GetFetchYourself() && len(resp.GetPeers()) == 0)
			if up := resp.GetUpstreamPieces(); len(up) > 0 {
				pieces := make([]int, len(up))
				for k, i := range up {
					pieces[k] = int(i)
				}
				run.GrantUpstream(pieces)
			}
			// The owner's piece checksums, read from the upstream, are the
			// ones every piece is checked against.
			run.SetAuthority(id)
			addParent(id, addrs[id], ordinary)
			for k, p := range resp.GetReaders() {
				// The owner names at most pieces.readers; past maxReaders a
				// list counts as ordinary peers, so no answer can make this
				// node follow the whole cluster.
				kind := reader
				if k >= maxReaders {
					kind = ordinary
				}
				addParent(p.GetId(), p.GetAddr(), kind)
			}
			for _, p := range resp.GetPeers() {
				addParent(p.GetId(), p.GetAddr(), ordinary)
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
		case <-children.ready:
			for _, m := range children.take() {
				addParent(m.ID, m.Addr, child)
			}
		}
	}
}

// parentKind is why a download follows a parent.
type parentKind int

const (
	// ordinary: the owner, or named by it; at most MaxPeers.
	ordinary parentKind = iota
	// reader: it reads pieces from the upstream for the owner, and no other
	// node has them until it sends them: followed whatever the number of
	// parents (the owner names at most pieces.readers; maxReaders bounds a
	// longer list).
	reader
	// child: it follows this node (FollowBack); at most
	// maxFollowedBack(MaxPeers) besides the others.
	child
)

// announcement is a parent's piece update, checked.
type announcement struct {
	has      []collector.Held
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
		return announcement{}, fmt.Errorf("piece plan %d/%d differs from %d/%d (is pieces.min_size the same on every node?)", up.GetSize(), up.GetPieceSize(), plan.Size, plan.PieceSize)
	}
	n := plan.Count()
	if len(up.GetPieces()) > n || len(up.GetFetching()) > n {
		return announcement{}, fmt.Errorf("%d pieces and %d fetching announced of %d", len(up.GetPieces()), len(up.GetFetching()), n)
	}
	a := announcement{complete: up.GetComplete(), has: make([]collector.Held, 0, len(up.GetPieces())), fetching: make([]int, 0, len(up.GetFetching()))}
	for _, p := range up.GetPieces() {
		if int64(p.GetIndex()) >= int64(n) {
			return announcement{}, fmt.Errorf("piece %d of %d", p.GetIndex(), n)
		}
		a.has = append(a.has, collector.Held{Index: int(p.GetIndex()), CRC: p.GetChecksum()})
	}
	for _, f := range up.GetFetching() {
		if int64(f) >= int64(n) {
			return announcement{}, fmt.Errorf("fetching piece %d of %d", f, n)
		}
		a.fetching = append(a.fetching, int(f))
	}
	if a.complete {
		// Every piece's checksum, each once: a repeat stands for a missing one.
		seen := make([]bool, n)
		distinct := 0
		for _, h := range a.has {
			if !seen[h.Index] {
				seen[h.Index] = true
				distinct++
			}
		}
		if distinct != n {
			return announcement{}, fmt.Errorf("complete, with checksums of %d of %d pieces", distinct, n)
		}
	}
	return a, nil
}

func (s *Downloader) logPicks(d digest.Digest, run *collector.Run) {
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
