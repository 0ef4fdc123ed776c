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
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
	"github.com/opencontainers/go-digest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/registry-proxy/registry-proxy/blobstore"
	"github.com/registry-proxy/registry-proxy/internal/ttlcache"
	"github.com/registry-proxy/registry-proxy/p2p/membership"
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
	crcs, _ := lru.New[digest.Digest, []uint32](1024)
	return &Server{
		opts:    opts,
		log:     opts.Logger.With("component", "swarm"),
		private: ttlcache.New[digest.Digest, struct{}](4096, privateFor),
		crcs:    crcs,
	}
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
	resp := &pb.RegisterResponse{}
	for _, p := range s.opts.Tracker.Register(d.String(), tracker.Peer{ID: who.ID, Addr: who.Addr, Seen: time.Now()}, s.opts.MaxPeers) {
		resp.Peers = append(resp.Peers, &pb.PeerRef{Id: p.ID, Addr: p.Addr})
	}

	if size, err := s.opts.Store.Stat(d); err == nil {
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
	t, err := s.opts.Owner.OpenForPeers(ctx, task.Request{Digest: d, Registry: req.GetRegistry(), Repo: req.GetRepository(), ForPeers: true})
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
// request must come from that member's address.
func (s *Server) Caller(ctx context.Context, claimed string) (membership.Member, error) {
	p, err := trust.Caller(ctx, claimed)
	switch {
	case errors.Is(err, trust.ErrNotSelf):
		return membership.Member{}, status.Error(codes.PermissionDenied, err.Error())
	case err != nil:
		return membership.Member{}, status.Error(codes.Unauthenticated, err.Error())
	}
	id := p.ID
	for _, m := range s.opts.Members.Members() {
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
	s.opts.Tracker.Hold(tracker.Peer{ID: who.ID, Addr: who.Addr, Seen: time.Now()}, keys)
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
