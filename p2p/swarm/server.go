package swarm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"sync"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
	"github.com/opencontainers/go-digest"
	"golang.org/x/time/rate"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/registry-proxy/registry-proxy/blobstore"
	"github.com/registry-proxy/registry-proxy/internal/ttlcache"
	"github.com/registry-proxy/registry-proxy/p2p/membership"
	"github.com/registry-proxy/registry-proxy/p2p/owner"
	"github.com/registry-proxy/registry-proxy/p2p/pb"
	"github.com/registry-proxy/registry-proxy/p2p/peer"
	"github.com/registry-proxy/registry-proxy/p2p/tracker"
	"github.com/registry-proxy/registry-proxy/p2p/trust"
	"github.com/registry-proxy/registry-proxy/piece"
	"github.com/registry-proxy/registry-proxy/proxy/upstream"
	"github.com/registry-proxy/registry-proxy/task"
)

// Tasks opens and finds this node's downloads; *task.Manager is one.
type Tasks interface {
	Open(ctx context.Context, req task.Request) (*task.Task, error)
	Lookup(d digest.Digest) (*task.Task, bool)
	Fetch(ctx context.Context, req task.Request, report func(done, size int64) error) error
}

// Blobs are the complete blobs this node holds; *blobstore.Store is one.
type Blobs interface {
	Stat(d digest.Digest) (int64, error)
	Get(ctx context.Context, d digest.Digest) (*blobstore.Blob, error)
}

// Sharing tells whether a blob may go to peers, asking the registry with
// no credentials when it does not know; *sharing.Policy is one.
type Sharing interface {
	LearnBlob(ctx context.Context, registry, repo string, d digest.Digest) bool
}

// Owned is the owner's download of a digest, as a registration sees it;
// *task.Task is one.
type Owned interface {
	Size() int64
	Pieces() (done []bool, crc []uint32)
}

// Owner starts the owner's download of a digest a node registers for: the
// task manager (Tasks) by default; the simulator's nodes are another.
type Owner interface {
	OpenForPeers(ctx context.Context, req task.Request) (Owned, error)
}

// tasksOwner is Tasks as the Owner.
type tasksOwner struct{ tasks Tasks }

func (o tasksOwner) OpenForPeers(ctx context.Context, req task.Request) (Owned, error) {
	t, err := o.tasks.Open(ctx, req)
	if err != nil {
		return nil, err
	}
	return t, nil
}

// Downloads tells what a running download fetches now, leaves pieces to
// delegates and follows the peers that follow it; *Downloader is one.
type Downloads interface {
	Progress(d digest.Digest) (fetching []int, seeding, ok bool)
	Delegate(d digest.Digest, pieces []int, reader string)
	FollowBack(d digest.Digest, child membership.Member)
}

// Uploads are upload capacities in bytes/s, 0 when unknown: this node's and
// another member's (from the host state it streams).
type Uploads interface {
	OwnUpload() float64
	UploadOf(id string) float64
}

// ServerOptions configure a Server.
type ServerOptions struct {
	Members Members
	// Sharing keeps private content from peers (p2p.share_private =
	// false); nil shares everything.
	Sharing Sharing
	// Tracker records the nodes that register for the digests this node
	// owns (shared with the Downloader).
	Tracker *tracker.Tracker
	Store   Blobs
	// Tasks starts the owner's downloads and serves running ones' pieces;
	// nil serves stored blobs only.
	Tasks Tasks
	// Owner starts the owner's downloads for registering nodes; nil: Tasks.
	Owner Owner
	// Downloads adds what running downloads fetch to their snapshots; may
	// be nil.
	Downloads Downloads
	// Registries checks a registry and repository a peer names before this
	// node fetches anything for it.
	Registries RegistryChecker
	// MaxPeers bounds the peer list an owner hands out.
	MaxPeers int
	// Pieces cuts stored blobs into pieces, as the tasks do.
	Pieces piece.Planner
	// Delegations and Uploads let a slow owner hand pieces to faster
	// registering nodes to read from the upstream; either nil: never.
	Delegations *Delegations
	Uploads     Uploads
	Logger      *slog.Logger
	// Self is this node's id: Register and Announce are refused for
	// digests it does not rank for (maxOwnerRank). Empty: not checked.
	Self string
	// Answered tells which peer addresses ever answered this node
	// (transfer.Pool.Answered): only those members rank as owners, as in
	// the Downloader. Nil: every member.
	Answered func(addrs []string) []bool
	// Bounds cap what a member can make this node do; zero fields take
	// the defaults (DefaultBounds).
	Bounds Bounds
	// Now is the clock of the bounds and tracker entries; nil: time.Now.
	Now func() time.Time
	// Refused, when not nil, is told of each Register or Announce refused
	// by a bound: call "register" or "announce", reason "not_owner",
	// "rate", "full" or "upstream".
	Refused func(call, reason string)
}

// Bounds cap what one member, or all of them, can make this node remember
// and fetch through Register and Announce (docs/security.md).
type Bounds struct {
	// CallRate and CallBurst: Register and Announce calls per member.
	CallRate  rate.Limit
	CallBurst int
	// NewRate and NewBurst: registrations for digests the member was not
	// registered for (a refresh is not new).
	NewRate  rate.Limit
	NewBurst int
	// RegPerMember and RegTotal: registrations the tracker holds, per
	// member and in all; HeldPerMember and HeldTotal the same for
	// announced blobs.
	RegPerMember, RegTotal   int
	HeldPerMember, HeldTotal int
	// RegTTL and HeldTTL: a registration or announcement not refreshed
	// for this long is forgotten.
	RegTTL, HeldTTL time.Duration
	// StartRate and StartBurst: owner downloads (new upstream requests)
	// started for one member; FailRate and FailBurst: those of them that
	// failed upstream. Past either, the member's Register for a digest
	// that would start one is refused and it fetches the blob itself.
	StartRate  rate.Limit
	StartBurst int
	FailRate   rate.Limit
	FailBurst  int
}

// DefaultBounds are the bounds a Server takes for the zero fields.
var DefaultBounds = Bounds{
	// Every download re-registers with its owner each second (Refresh), and
	// a member runs at most limits.tasks (256) downloads: 512 calls/s with a
	// burst of 1024 never refuses a working member, and the calls past it
	// cost a token-bucket check each.
	CallRate: 512, CallBurst: 1024,
	// New registrations: a member's 256 downloads may all start at once;
	// past that, 32 new digests a second is more than any node pulls.
	NewRate: 32, NewBurst: 256,
	// Registrations last while a download runs (refreshed each second):
	// 4096 per member is 16 times limits.tasks; 65536 in all is a few MB.
	RegPerMember: 4096, RegTotal: 65536,
	// A member announces only the blobs this node owns of those it holds,
	// about 1/N of them: 16384 per member, 131072 in all (tens of MB at
	// most).
	HeldPerMember: 16384, HeldTotal: 131072,
	// Registrations are refreshed each second while their download runs:
	// 30 min is long past any. Announcements are sent again every 5 min
	// (Announcer.Refresh): 15 min survives two lost ones.
	RegTTL: 30 * time.Minute, HeldTTL: 15 * time.Minute,
	// Owner downloads for one member: 32 at once, then one a second; of
	// those, 8 may fail upstream (a digest the registry does not have, a
	// private one), then one each 10 s: random digests cost the registry
	// a handful of HEADs, not one each.
	StartRate: 1, StartBurst: 32,
	FailRate: rate.Every(10 * time.Second), FailBurst: 8,
}

// maxOwnerRank is the last rendezvous rank (0: the owner) at which this
// node accepts Register and Announce for a digest: a member tries the next
// in rank when the owner does not answer, and members' views of the
// membership differ for a few gossip rounds.
const maxOwnerRank = 2

// maxRankWork bounds one announcement's rank checks (blobs × members
// hashed): a member sends only the blobs this node owns, about 1/N of
// what it holds, so a member holding under a million blobs stays under.
const maxRankWork = 1 << 20

// failedFor is how long a digest whose owner download failed (other than
// as private) is answered Unavailable without asking the upstream again.
const failedFor = 10 * time.Second

// memberBounds are one member's token buckets.
type memberBounds struct {
	calls, news, starts, fails *rate.Limiter
	used                       time.Time
}

// Server is this node's side for its peers: the tracker of the digests it
// owns (pb.TrackerServer) and the pieces it has (peer.Source).
type Server struct {
	pb.UnimplementedTrackerServer
	opts ServerOptions
	log  *slog.Logger
	// private remembers digests this node could not fetch with its own
	// credentials, so registering nodes fetch them themselves.
	// Each for privateFor.
	private *ttlcache.Cache[digest.Digest, struct{}]
	// crcs holds stored blobs' piece checksums, for peers watching them.
	crcs *lru.Cache[digest.Digest, []uint32]
	// failed remembers digests whose owner download just failed, for
	// failedFor: a flood of registrations for them asks the upstream once.
	failed *ttlcache.Cache[digest.Digest, struct{}]

	mu      sync.Mutex
	members map[string]*memberBounds
}

// privateFor is how long registering nodes fetch a digest themselves after
// the owner could not: past it, the owner tries again (credentials change).
const privateFor = time.Minute

// NewServer returns a server.
func NewServer(opts ServerOptions) *Server {
	if opts.MaxPeers <= 0 {
		opts.MaxPeers = 32
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Tracker == nil {
		opts.Tracker = tracker.New(nil)
	}
	if opts.Owner == nil && opts.Tasks != nil {
		opts.Owner = tasksOwner{opts.Tasks}
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	opts.Bounds = opts.Bounds.withDefaults()
	b := opts.Bounds
	opts.Tracker.SetLimits(tracker.Limits{PerPeer: b.RegPerMember, Total: b.RegTotal, HeldPerPeer: b.HeldPerMember, HeldTotal: b.HeldTotal,
		RegisterTTL: b.RegTTL, HoldTTL: b.HeldTTL, Now: opts.Now})
	crcs, _ := lru.New[digest.Digest, []uint32](1024)
	return &Server{
		opts:    opts,
		log:     opts.Logger.With("component", "swarm"),
		private: ttlcache.New[digest.Digest, struct{}](4096, privateFor),
		failed:  ttlcache.New[digest.Digest, struct{}](4096, failedFor),
		crcs:    crcs,
		members: map[string]*memberBounds{},
	}
}

// withDefaults fills b's zero fields from DefaultBounds.
func (b Bounds) withDefaults() Bounds {
	d := DefaultBounds
	pick := func(v *int, def int) {
		if *v <= 0 {
			*v = def
		}
	}
	pickRate := func(v *rate.Limit, def rate.Limit) {
		if *v <= 0 {
			*v = def
		}
	}
	pickRate(&b.CallRate, d.CallRate)
	pick(&b.CallBurst, d.CallBurst)
	pickRate(&b.NewRate, d.NewRate)
	pick(&b.NewBurst, d.NewBurst)
	pick(&b.RegPerMember, d.RegPerMember)
	pick(&b.RegTotal, d.RegTotal)
	pick(&b.HeldPerMember, d.HeldPerMember)
	pick(&b.HeldTotal, d.HeldTotal)
	if b.RegTTL <= 0 {
		b.RegTTL = d.RegTTL
	}
	if b.HeldTTL <= 0 {
		b.HeldTTL = d.HeldTTL
	}
	pickRate(&b.StartRate, d.StartRate)
	pick(&b.StartBurst, d.StartBurst)
	pickRate(&b.FailRate, d.FailRate)
	pick(&b.FailBurst, d.FailBurst)
	return b
}

// bounds are member id's token buckets, made on first use. Members that
// left are forgotten once the map outgrows the membership.
func (s *Server) bounds(id string, now time.Time) *memberBounds {
	s.mu.Lock()
	defer s.mu.Unlock()
	mb := s.members[id]
	if mb == nil {
		if len(s.members) >= 64 && len(s.members) >= 2*len(s.opts.Members.Members()) {
			for k, v := range s.members {
				if now.Sub(v.used) > 10*time.Minute {
					delete(s.members, k)
				}
			}
		}
		b := s.opts.Bounds
		mb = &memberBounds{
			calls:  rate.NewLimiter(b.CallRate, b.CallBurst),
			news:   rate.NewLimiter(b.NewRate, b.NewBurst),
			starts: rate.NewLimiter(b.StartRate, b.StartBurst),
			fails:  rate.NewLimiter(b.FailRate, b.FailBurst),
		}
		s.members[id] = mb
	}
	mb.used = now
	return mb
}

// refuse counts a refusal and returns its error.
func (s *Server) refuse(call, reason string, code codes.Code, format string, args ...any) error {
	if s.opts.Refused != nil {
		s.opts.Refused(call, reason)
	}
	return status.Errorf(code, format, args...)
}

// ranks tells whether this node is among the first maxOwnerRank+1 in
// key's rendezvous rank over ids (always, without Self).
func (s *Server) ranks(key string, ids []string) bool {
	if s.opts.Self == "" {
		return true
	}
	r := owner.Rank(key, ids)
	return slices.Contains(r[:min(len(r), maxOwnerRank+1)], s.opts.Self)
}

// memberIDs are the live members' ids.
func (s *Server) memberIDs() []string {
	ms := s.opts.Members.Members()
	if s.opts.Answered != nil {
		ms = answering(s.opts.Self, s.opts.Answered, ms)
	}
	ids := make([]string, len(ms))
	for i, m := range ms {
		ids[i] = m.ID
	}
	return ids
}

// running tells whether a download of d runs here (opening ones aside).
func (s *Server) running(d digest.Digest) bool {
	if s.opts.Tasks == nil {
		return false
	}
	_, ok := s.opts.Tasks.Lookup(d)
	return ok
}

// Register implements pb.TrackerServer: a node fetching a digest this node
// owns. The owner starts fetching the blob itself if no download runs here,
// with its own credentials. The registering node is recorded under the id
// its certificate names and the address gossip knows for it, nothing it
// merely claims.
func (s *Server) Register(ctx context.Context, req *pb.RegisterRequest) (*pb.RegisterResponse, error) {
	d, err := digest.Parse(req.GetDigest())
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "digest: %v", err)
	}
	who, err := s.Caller(ctx, req.GetHostId())
	if err != nil {
		return nil, err
	}
	if err := s.checkSource(req.GetRegistry(), req.GetRepository()); err != nil {
		return nil, err
	}
	// Bounds (docs/security.md): calls per member, only the digest's
	// owners record it, owner downloads per member, registrations per
	// member and in all. Refused, nothing is recorded or fetched.
	now := s.opts.Now()
	mb := s.bounds(who.ID, now)
	if !mb.calls.AllowN(now, 1) {
		return nil, s.refuse("register", "rate", codes.ResourceExhausted, "too many calls from %s", who.ID)
	}
	if !s.ranks(d.String(), s.memberIDs()) {
		return nil, s.refuse("register", "not_owner", codes.FailedPrecondition, "%s does not own %s", s.opts.Self, d)
	}
	if s.opts.Sharing != nil && !s.opts.Sharing.LearnBlob(ctx, req.GetRegistry(), req.GetRepository(), d) {
		// p2p.share_private = false: private content is neither fetched
		// for nor sent to peers, and nobody is handed out as a peer for it.
		return &pb.RegisterResponse{FetchYourself: true}, nil
	}
	size, statErr := s.opts.Store.Stat(d)
	// Would this registration start an upstream request? Not for a stored
	// blob, a running download (task.Manager.Open shares it), or one that
	// just failed (private, failed).
	start := statErr != nil && s.opts.Owner != nil && !s.private.Contains(d) && !s.failed.Contains(d) && !s.running(d)
	// The failure budget is taken before the fetch and given back when it
	// does not fail, so calls at once cannot all pass a check of it.
	var failTok *rate.Reservation
	fetchFailed := false
	defer func() {
		if failTok != nil && !fetchFailed {
			failTok.CancelAt(now)
		}
	}()
	if start {
		if failTok = mb.fails.ReserveN(now, 1); !failTok.OK() || failTok.DelayFrom(now) > 0 {
			return nil, s.refuse("register", "upstream", codes.ResourceExhausted, "too many downloads for %s failed; fetch %s yourself", who.ID, d)
		}
		if !mb.starts.AllowN(now, 1) {
			return nil, s.refuse("register", "upstream", codes.ResourceExhausted, "too many downloads started for %s; fetch %s yourself", who.ID, d)
		}
	}
	var newRate bool
	peers, err := s.opts.Tracker.TryRegister(d.String(), tracker.Peer{ID: who.ID, Addr: who.Addr, Seen: now}, s.opts.MaxPeers, func() error {
		if !mb.news.AllowN(now, 1) {
			newRate = true
			return errors.New("too many new registrations")
		}
		return nil
	})
	switch {
	case newRate:
		return nil, s.refuse("register", "rate", codes.ResourceExhausted, "too many new registrations from %s", who.ID)
	case err != nil:
		return nil, s.refuse("register", "full", codes.ResourceExhausted, "%v", err)
	}
	resp := &pb.RegisterResponse{}
	for _, p := range peers {
		resp.Peers = append(resp.Peers, &pb.PeerRef{Id: p.ID, Addr: p.Addr})
	}

	if statErr == nil {
		resp.Size = size
		return resp, nil
	}
	if s.opts.Owner == nil {
		return resp, nil
	}
	if s.private.Contains(d) {
		resp.FetchYourself = true
		return resp, nil
	}
	if s.failed.Contains(d) {
		return nil, status.Errorf(codes.Unavailable, "owner could not fetch %s just now", d)
	}
	t, err := s.opts.Owner.OpenForPeers(ctx, task.Request{Digest: d, Registry: req.GetRegistry(), Repo: req.GetRepository(), ForPeers: true})
	// Only a failed fetch keeps the failure budget it took.
	fetchFailed = start && err != nil && !errors.Is(err, task.ErrComplete) && ctx.Err() == nil
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
		if ctx.Err() == nil && !errors.Is(err, task.ErrTooMany) && !errors.Is(err, task.ErrDraining) {
			s.failed.Add(d, struct{}{})
		}
		return nil, status.Errorf(codes.Unavailable, "owner cannot fetch %s: %v", d, err)
	default:
		resp.Size = t.Size()
		resp.UpstreamPieces = s.delegate(d, t, who.ID)
		resp.Readers = s.readers(d, who.ID)
	}
	return resp, nil
}

// readers are d's delegates but node, as peers: the nodes with pieces no
// other node has until they send them.
func (s *Server) readers(d digest.Digest, node string) []*pb.PeerRef {
	if s.opts.Delegations == nil {
		return nil
	}
	ids := s.opts.Delegations.Claimants(d)
	if len(ids) == 0 {
		return nil
	}
	var out []*pb.PeerRef
	for _, m := range s.opts.Members.Members() {
		if m.ID != node && slices.Contains(ids, m.ID) {
			out = append(out, &pb.PeerRef{Id: m.ID, Addr: m.Addr})
		}
	}
	return out
}

// delegate hands node pieces of t to read from the upstream when this
// owner's upload is much the slower (Delegations).
func (s *Server) delegate(d digest.Digest, t Owned, node string) []uint32 {
	if s.opts.Delegations == nil || s.opts.Uploads == nil || s.opts.Downloads == nil {
		return nil
	}
	done, _ := t.Pieces()
	uploads := func() map[string]float64 {
		m := map[string]float64{}
		for _, member := range s.opts.Members.Members() {
			m[member.ID] = s.opts.Uploads.UploadOf(member.ID)
		}
		return m
	}
	pieces := s.opts.Delegations.Register(s.opts.Downloads, d, done, node, s.opts.Uploads.OwnUpload(), uploads)
	if len(pieces) > 0 {
		s.log.Debug("pieces delegated", "digest", d, "node", node, "pieces", len(pieces), "of", len(done))
	}
	return pieces
}

// checkSource refuses, as an invalid argument, a registry or repository a
// peer names that this node may not fetch.
func (s *Server) checkSource(registry, repo string) error {
	if s.opts.Registries == nil {
		return nil
	}
	if err := s.opts.Registries.CheckRepository(registry, repo); err != nil {
		return status.Errorf(codes.InvalidArgument, "%v", err)
	}
	return nil
}

// Caller is the member behind a request: the id it authenticated with (on
// an insecure peer port, the id it claims) must be a live member, and the
// request must come from that member's address (member).
func (s *Server) Caller(ctx context.Context, claimed string) (membership.Member, error) {
	p, err := trust.Caller(ctx, claimed)
	switch {
	case errors.Is(err, trust.ErrNotSelf):
		return membership.Member{}, status.Error(codes.PermissionDenied, err.Error())
	case err != nil:
		return membership.Member{}, status.Error(codes.Unauthenticated, err.Error())
	case p.ReadOnly:
		// A debugging certificate (registry-proxy cert) reads what its
		// member reads (Member); it does not act as the member.
		return membership.Member{}, status.Errorf(codes.PermissionDenied, "%q authenticated with a read-only certificate: this call acts as a member", p.ID)
	}
	m, err := s.member(p)
	if err != nil {
		return membership.Member{}, status.Error(codes.PermissionDenied, err.Error())
	}
	return m, nil
}

// Member implements peer.Authenticator: the same rule as Caller, for the
// requests the peer server checks itself (pieces, WatchPieces, SyncHost).
func (s *Server) Member(p trust.Peer) error {
	_, err := s.member(p)
	return err
}

// ErrNotMember refuses a caller that is not a live member or calls from
// another address than the one the member gossips from.
var ErrNotMember = errors.New("swarm: not a live member at this address")

// member is the one place of the rule: p.ID names a live member and p.IP
// is the host of that member's peer address (which membership binds to the
// address it gossips from).
func (s *Server) member(p trust.Peer) (membership.Member, error) {
	if p.ID == "" {
		return membership.Member{}, fmt.Errorf("%w: the request names no node", ErrNotMember)
	}
	for _, m := range s.opts.Members.Members() {
		if m.ID != p.ID {
			continue
		}
		// Membership binds a member's peer address to the IP it gossips
		// from (membership.Bound), and servers know the caller's IP: the
		// simulator's, which have neither, skip the address check.
		host, _, err := net.SplitHostPort(m.Addr)
		if ip := net.ParseIP(host); err == nil && ip != nil && p.IP != nil && !ip.Equal(p.IP) {
			return membership.Member{}, fmt.Errorf("%w: node %q is a member at %s, the request came from %s", ErrNotMember, p.ID, m.Addr, p.IP)
		}
		return m, nil
	}
	return membership.Member{}, fmt.Errorf("%w: node %q is not a member", ErrNotMember, p.ID)
}

// Watching implements peer.Children: this node's download of d follows
// back a member that follows it (Downloader.FollowBack).
func (s *Server) Watching(ctx context.Context, d digest.Digest, child string) {
	if s.opts.Downloads == nil {
		return
	}
	m, err := s.Caller(ctx, child)
	if err != nil {
		s.log.Debug("not following back a watching peer", "peer", child, "digest", d, "err", err)
		return
	}
	s.opts.Downloads.FollowBack(d, m)
}

// Snapshot implements peer.Source.
func (s *Server) Snapshot(ctx context.Context, d digest.Digest) (peer.Snapshot, <-chan struct{}, bool) {
	if size, err := s.opts.Store.Stat(d); err == nil {
		plan := s.opts.Pieces.For(size)
		crcs, err := s.pieceChecksums(ctx, d, plan)
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
	if s.opts.Tasks == nil {
		return peer.Snapshot{}, nil, false
	}
	t, ok := s.opts.Tasks.Lookup(d)
	if !ok {
		return peer.Snapshot{}, nil, false
	}
	t.Touch() // a peer watches it: keep it going with no reader here
	ch := t.Changed()
	done, crc := t.Pieces()
	snap := peer.Snapshot{Plan: t.Plan(), Done: done, CRC: crc}
	if s.opts.Downloads != nil {
		snap.Fetching, snap.Seeding, _ = s.opts.Downloads.Progress(d)
	}
	return snap, ch, true
}

// pieceChecksums are the piece checksums of a stored blob, computed once
// (one read of the blob) and remembered.
func (s *Server) pieceChecksums(ctx context.Context, d digest.Digest, plan piece.Plan) ([]uint32, error) {
	if c, ok := s.crcs.Get(d); ok && len(c) == plan.Count() {
		return c, nil
	}
	b, err := s.opts.Store.Get(ctx, d)
	if err != nil {
		return nil, err
	}
	defer b.Close()
	crcs := make([]uint32, plan.Count())
	buf := make([]byte, 1<<20)
	for i := range crcs {
		off, n := plan.Range(i)
		h := piece.NewChecksum()
		if _, err := io.CopyBuffer(h, io.NewSectionReader(b, off, n), buf); err != nil {
			return nil, fmt.Errorf("swarm: checksum piece %d of %s: %w", i, d, err)
		}
		crcs[i] = h.Sum32()
	}
	s.crcs.Add(d, crcs)
	return crcs, nil
}

// OpenPiece implements peer.Source.
func (s *Server) OpenPiece(ctx context.Context, d digest.Digest, i int) (io.ReadSeeker, int64, int64, func(), error) {
	if b, err := s.opts.Store.Get(ctx, d); err == nil {
		plan := s.opts.Pieces.For(b.Size)
		if i >= plan.Count() {
			b.Close()
			return nil, 0, 0, nil, peer.ErrNoPiece
		}
		off, n := plan.Range(i)
		return b.Content, off, n, func() { b.Close() }, nil
	}
	if s.opts.Tasks == nil {
		return nil, 0, 0, nil, peer.ErrNoPiece
	}
	t, ok := s.opts.Tasks.Lookup(d)
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

// maxAnnounced bounds one announcement's blobs.
const maxAnnounced = 1 << 18

// Announce implements pb.TrackerServer: a node's complete blobs among the
// digests this node owns, recorded under the id it authenticated with and
// the address gossip knows for it.
func (s *Server) Announce(ctx context.Context, req *pb.AnnounceRequest) (*pb.AnnounceResponse, error) {
	who, err := s.Caller(ctx, req.GetHostId())
	if err != nil {
		return nil, err
	}
	if len(req.GetBlobs()) > maxAnnounced {
		return nil, status.Errorf(codes.InvalidArgument, "%d blobs announced at once, at most %d", len(req.GetBlobs()), maxAnnounced)
	}
	keys := make([]string, 0, len(req.GetBlobs()))
	for _, b := range req.GetBlobs() {
		d, err := digest.Parse(b.GetDigest())
		if err != nil || b.GetSize() < 0 {
			return nil, status.Errorf(codes.InvalidArgument, "blob %q of size %d: %v", b.GetDigest(), b.GetSize(), err)
		}
		keys = append(keys, d.String())
	}
	now := s.opts.Now()
	if !s.bounds(who.ID, now).calls.AllowN(now, 1) {
		return nil, s.refuse("announce", "rate", codes.ResourceExhausted, "too many calls from %s", who.ID)
	}
	if len(keys) > s.opts.Bounds.HeldPerMember {
		return nil, s.refuse("announce", "full", codes.ResourceExhausted, "%d blobs announced, at most %d", len(keys), s.opts.Bounds.HeldPerMember)
	}
	// Only the digests this node ranks for are recorded; the others are
	// dropped (the member's view of the owners differs, or it lies).
	if s.opts.Self != "" && len(keys) > 0 {
		ids := s.memberIDs()
		if len(keys)*len(ids) > maxRankWork {
			return nil, s.refuse("announce", "full", codes.ResourceExhausted, "%d blobs announced among %d members, at most %d in all", len(keys), len(ids), maxRankWork)
		}
		kept := keys[:0]
		for _, k := range keys {
			if s.ranks(k, ids) {
				kept = append(kept, k)
			}
		}
		if dropped := len(keys) - len(kept); dropped > 0 && s.opts.Refused != nil {
			s.opts.Refused("announce", "not_owner")
		}
		keys = kept
	}
	if err := s.opts.Tracker.TryHold(tracker.Peer{ID: who.ID, Addr: who.Addr, Seen: now}, keys); err != nil {
		return nil, s.refuse("announce", "full", codes.ResourceExhausted, "%v", err)
	}
	return &pb.AnnounceResponse{}, nil
}

// Preheat implements pb.TrackerServer: a member has this node fetch a blob
// with its own credentials (task.Manager.Fetch) and follows its progress.
func (s *Server) Preheat(req *pb.PreheatRequest, stream pb.Tracker_PreheatServer) error {
	ctx := stream.Context()
	if _, err := s.Caller(ctx, req.GetHostId()); err != nil {
		return err
	}
	d, err := digest.Parse(req.GetDigest())
	if err != nil {
		return status.Errorf(codes.InvalidArgument, "digest: %v", err)
	}
	if s.opts.Tasks == nil {
		return status.Error(codes.Unavailable, "this node fetches nothing")
	}
	if err := s.checkSource(req.GetRegistry(), req.GetRepository()); err != nil {
		return err
	}
	err = s.opts.Tasks.Fetch(ctx, task.Request{Digest: d, Registry: req.GetRegistry(), Repo: req.GetRepository(), ForPeers: true},
		func(done, size int64) error {
			return stream.Send(&pb.PreheatProgress{Size: size, Done: done, Complete: done == size && size >= 0})
		})
	var se *upstream.StatusError
	switch {
	case err == nil, ctx.Err() != nil:
		return err
	case errors.As(err, &se):
		return status.Errorf(codes.FailedPrecondition, "%v", err)
	case errors.Is(err, task.ErrTooLarge), errors.Is(err, upstream.ErrUnknownRegistry), errors.Is(err, upstream.ErrBadRepository), errors.Is(err, upstream.ErrForbiddenAddress):
		return status.Errorf(codes.InvalidArgument, "%v", err)
	}
	return status.Errorf(codes.Unavailable, "%v", err)
}
