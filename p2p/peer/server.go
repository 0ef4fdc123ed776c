// Package peer serves this node to its peers on the peer address: piece bytes
// over plain HTTP (GET /pieces/<digest>/<index>, sendfile from the blob or the
// partial file), and the gRPC services (SyncHost, WatchPieces, Register) on
// the same port over HTTP/2. With the cluster's TLS every request comes from
// a holder of the cluster's certificates; Options.Auth then admits only live
// members calling from their gossiped address (without TLS, p2p.insecure,
// under the id they claim). It serves content by digest only.
package peer

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"

	"github.com/registry-proxy/registry-proxy/internal/pace"
	"github.com/registry-proxy/registry-proxy/internal/progress"
	"github.com/registry-proxy/registry-proxy/metrics"
	"github.com/registry-proxy/registry-proxy/p2p/hoststate"
	"github.com/registry-proxy/registry-proxy/p2p/pb"
	"github.com/registry-proxy/registry-proxy/p2p/seeding"
	"github.com/registry-proxy/registry-proxy/p2p/trust"
	"github.com/registry-proxy/registry-proxy/piece"
)

// OfferedHeader, on a 409 (piece sent elsewhere), names the pieces this
// node would send instead, as piece.EncodeSet writes them.
const OfferedHeader = "Pieces-Offered"

// ErrNoPiece means this node does not have the piece (yet).
var ErrNoPiece = errors.New("peer: piece not here")

// Snapshot is what this node has of one blob now.
type Snapshot struct {
	Plan     piece.Plan
	Done     []bool
	CRC      []uint32 // valid where Done; zero for a complete blob
	Fetching []int
	Complete bool
	// Seeding: this node fetches the blob from the upstream now, so every
	// piece it lacks is on its way.
	Seeding bool
}

// Offer is what this node offers as first copies (super-seeding,
// Admission): every piece while it fetches from the upstream or once it
// holds the blob, else the pieces it holds. The peer server and the
// simulator both ask it.
func (s Snapshot) Offer() seeding.Offer {
	return seeding.Offer{All: s.Seeding || s.Complete, Held: s.Done}
}

// Source is the content this node can serve.
type Source interface {
	// Snapshot returns what the node has of d and a channel closed at the
	// next change; ok is false when it has nothing of d.
	Snapshot(ctx context.Context, d digest.Digest) (s Snapshot, changed <-chan struct{}, ok bool)
	// OpenPiece opens what holds piece i of d (an *os.File is sent by the
	// kernel's sendfile); the caller calls release when done with it.
	OpenPiece(ctx context.Context, d digest.Digest, i int) (f io.ReadSeeker, off, n int64, release func(), err error)
}

// Children hears of the peers that follow this node's pieces of a blob.
type Children interface {
	// Watching is called as child starts following d here; ctx is the
	// request's, which authenticates the child.
	Watching(ctx context.Context, d digest.Digest, child string)
}

// Authenticator holds the rule for who the peer port answers: a live
// member, under the id its certificate names (on an insecure port, the id
// it claims), calling from the address it gossips from. *swarm.Server is
// one; the same rule guards Register, Announce and Preheat there.
type Authenticator interface {
	Member(p trust.Peer) error
}

// Options configure a Server.
type Options struct {
	Source Source
	// Auth admits the callers of pieces, WatchPieces and SyncHost; nil
	// admits whoever the TLS admits (tests).
	Auth Authenticator
	// Children hears of each peer that watches a blob's pieces; may be nil.
	Children Children
	Meter    *hoststate.Meter
	// Ledger refuses duplicates of pieces while new ones wait (409); nil
	// sends every piece asked for.
	Ledger   *seeding.Ledger
	HostSync pb.HostSyncServer
	Tracker  pb.TrackerServer
	// Manifests serves manifests and tag resolutions; nil: not served.
	Manifests pb.ManifestsServer
	// TLS requires every peer to authenticate (mutual TLS); nil serves
	// plaintext (p2p.insecure).
	TLS *tls.Config
	// WriteStall cuts off a peer that takes no bytes of a piece for this long.
	WriteStall time.Duration
	// Faults make this node lie to its peers; set only in binaries built
	// with -tags faults, for tests of what children do with a lying member.
	Faults Faults
	Logger *slog.Logger
	// Metrics counts uploads; may be nil.
	Metrics *metrics.Metrics
}

// Server is the peer endpoint.
type Server struct {
	pb.UnimplementedPiecesServer
	opts Options
	log  *slog.Logger
	grpc *grpc.Server
	http *http.Server
}

// NewServer returns a peer server.
func NewServer(opts Options) *Server {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	s := &Server{opts: opts, log: opts.Logger.With("component", "peer-server")}
	s.grpc = grpc.NewServer(grpc.MaxRecvMsgSize(1 << 20))
	pb.RegisterHostSyncServer(s.grpc, hostSync{opts.HostSync, opts.Auth})
	pb.RegisterPiecesServer(s.grpc, s)
	pb.RegisterTrackerServer(s.grpc, opts.Tracker)
	if opts.Manifests != nil {
		pb.RegisterManifestsServer(s.grpc, opts.Manifests)
	}
	hs := health.NewServer()
	healthpb.RegisterHealthServer(s.grpc, hs)
	reflection.Register(s.grpc)

	mux := http.NewServeMux()
	mux.HandleFunc("GET /pieces/{digest}/{index}", s.servePiece)
	var protos http.Protocols
	protos.SetHTTP1(true)
	if opts.TLS != nil {
		protos.SetHTTP2(true)
	} else {
		protos.SetUnencryptedHTTP2(true)
	}
	s.http = &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.ProtoMajor == 2 && strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc") {
				s.grpc.ServeHTTP(w, r)
				return
			}
			mux.ServeHTTP(w, r)
		}),
		Protocols:         &protos,
		TLSConfig:         opts.TLS,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    16 << 10,
	}
	return s
}

// Serve serves on ln until Shutdown.
func (s *Server) Serve(ln net.Listener) error {
	var err error
	if s.opts.TLS != nil {
		err = s.http.ServeTLS(ln, "", "")
	} else {
		err = s.http.Serve(ln)
	}
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

// Shutdown stops serving; streams are cut, piece uploads in flight finish
// until ctx ends.
func (s *Server) Shutdown(ctx context.Context) error {
	s.grpc.Stop()
	return s.http.Shutdown(ctx)
}

// Close stops serving and cuts every connection, uploads in flight too.
func (s *Server) Close() error {
	s.grpc.Stop()
	return s.http.Close()
}

// hostSync admits SyncHost subscribers as the other calls: live members
// only, so invented names cannot fill its subscribers.
type hostSync struct {
	pb.HostSyncServer
	auth Authenticator
}

func (h hostSync) SyncHost(req *pb.SyncHostRequest, stream pb.HostSync_SyncHostServer) error {
	if err := grpcMember(stream.Context(), h.auth, req.GetHostId()); err != nil {
		return err
	}
	return h.HostSyncServer.SyncHost(req, stream)
}

// grpcMember applies auth to the caller of a gRPC request naming claimed.
func grpcMember(ctx context.Context, auth Authenticator, claimed string) error {
	p, err := trust.Caller(ctx, claimed)
	switch {
	case errors.Is(err, trust.ErrNotSelf):
		return status.Error(codes.PermissionDenied, err.Error())
	case auth == nil:
		return nil
	case err != nil:
		return status.Error(codes.Unauthenticated, err.Error())
	}
	if err := auth.Member(p); err != nil {
		return status.Error(codes.PermissionDenied, err.Error())
	}
	return nil
}

// httpMember applies auth to the caller of a piece request; false when it
// answered the refusal.
func (s *Server) httpMember(w http.ResponseWriter, r *http.Request) bool {
	p, err := trust.HTTPCaller(r)
	switch {
	case errors.Is(err, trust.ErrNotSelf):
		http.Error(w, err.Error(), http.StatusForbidden)
		return false
	case err != nil:
		http.Error(w, err.Error(), http.StatusUnauthorized)
		return false
	}
	if s.opts.Auth == nil {
		return true
	}
	if err := s.opts.Auth.Member(p); err != nil {
		s.log.Debug("piece request refused", "peer", p.ID, "from", p.IP, "err", err)
		http.Error(w, err.Error(), http.StatusForbidden)
		return false
	}
	return true
}

func (s *Server) servePiece(w http.ResponseWriter, r *http.Request) {
	if !s.httpMember(w, r) {
		return
	}
	d, err := digest.Parse(r.PathValue("digest"))
	if err != nil {
		http.Error(w, "bad digest", http.StatusBadRequest)
		return
	}
	i, err := strconv.Atoi(r.PathValue("index"))
	if err != nil || i < 0 {
		http.Error(w, "bad piece index", http.StatusBadRequest)
		return
	}
	result, sentBytes := "error", int64(0)
	defer func() { s.opts.Metrics.Upload(result, sentBytes) }()
	f, off, n, release, err := s.opts.Source.OpenPiece(r.Context(), d, i)
	if err != nil {
		if errors.Is(err, ErrNoPiece) {
			result = "absent"
			http.Error(w, "piece not here", http.StatusNotFound)
			return
		}
		s.log.Warn("opening piece", "digest", d, "piece", i, "err", err)
		http.Error(w, "cannot read piece", http.StatusInternalServerError)
		return
	}
	defer release()
	count, offer, reading := 0, seeding.Offer{All: true}, false
	if s.opts.Ledger != nil {
		snap, _, _ := s.opts.Source.Snapshot(r.Context(), d)
		count, offer, reading = snap.Plan.Count(), snap.Offer(), snap.Seeding
	}
	admitted, err := Admission{Meter: s.opts.Meter, Ledger: s.opts.Ledger}.Admit(d, i, count, offer, reading)
	switch {
	case errors.Is(err, hoststate.ErrBusy):
		result = "busy"
		w.Header().Set("Retry-After", "1")
		http.Error(w, err.Error(), http.StatusServiceUnavailable)
		return
	case errors.Is(err, ErrSentElsewhere):
		result = "conflict"
		if offered := Offered(err); offered != "" {
			w.Header().Set(OfferedHeader, offered)
		}
		http.Error(w, err.Error(), http.StatusConflict)
		return
	}
	sent := false
	defer func() { admitted(sent) }()
	if _, err := f.Seek(off, io.SeekStart); err != nil {
		http.Error(w, "cannot read piece", http.StatusInternalServerError)
		return
	}
	pw := progress.New(w, s.opts.WriteStall)
	defer pw.Done()
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
	var dst io.Writer = pw
	if s.opts.Faults.CorruptPieces {
		dst = &corruptWriter{w: dst}
	}
	if s.opts.Faults.TrickleBps > 0 {
		dst = pace.NewBurst(uint64(s.opts.Faults.TrickleBps), 1024).Writer(r.Context(), dst)
	}
	if s.opts.Meter != nil {
		dst = s.opts.Meter.Upload().Writer(r.Context(), dst)
	}
	// To an *http.response with an *os.File behind a LimitedReader the
	// kernel's sendfile does the copy.
	sentBytes, err = io.Copy(dst, &io.LimitedReader{R: f, N: n})
	if err != nil {
		if r.Context().Err() == nil {
			s.log.Debug("sending piece", "digest", d, "piece", i, "err", err)
		}
		return
	}
	sent, result = true, "ok"
}

// Faults are the lies a test node tells its peers.
type Faults struct {
	// CorruptPieces flips a byte of every piece sent.
	CorruptPieces bool
	// ClaimComplete announces every blob it has anything of as complete.
	ClaimComplete bool
	// TrickleBps sends piece bytes at this rate.
	TrickleBps int64
}

// corruptWriter flips the first byte it writes.
type corruptWriter struct {
	w    io.Writer
	done bool
}

func (c *corruptWriter) Write(b []byte) (int, error) {
	if !c.done && len(b) > 0 {
		c.done = true
		b = append([]byte{b[0] ^ 0xff}, b[1:]...)
	}
	return c.w.Write(b)
}

// WatchPieces implements pb.PiecesServer.
func (s *Server) WatchPieces(req *pb.WatchPiecesRequest, stream pb.Pieces_WatchPiecesServer) error {
	d, err := digest.Parse(req.GetDigest())
	if err != nil {
		return status.Errorf(codes.InvalidArgument, "digest: %v", err)
	}
	if err := grpcMember(stream.Context(), s.opts.Auth, req.GetHostId()); err != nil {
		return err
	}
	snap, changed, ok := s.opts.Source.Snapshot(stream.Context(), d)
	if !ok {
		return status.Errorf(codes.NotFound, "%s: not here", d)
	}
	if s.opts.Children != nil {
		s.opts.Children.Watching(stream.Context(), d, req.GetHostId())
	}
	sent := make([]bool, len(snap.Done))
	var lastFetching string
	first := true
	for {
		up := &pb.PieceUpdate{Digest: d.String(), Size: snap.Plan.Size, PieceSize: snap.Plan.PieceSize, Complete: snap.Complete || s.opts.Faults.ClaimComplete}
		for i, done := range snap.Done {
			// A complete update carries every piece's checksum, sent
			// before or not: it stands alone.
			if up.Complete || (done && !sent[i]) {
				up.Pieces = append(up.Pieces, &pb.Piece{Index: uint32(i), Checksum: snap.CRC[i]})
				sent[i] = true
			}
		}
		fetching := fmt.Sprint(snap.Fetching)
		if first || len(up.Pieces) > 0 || snap.Complete || fetching != lastFetching {
			for _, f := range snap.Fetching {
				up.Fetching = append(up.Fetching, uint32(f))
			}
			if err := stream.Send(up); err != nil {
				return err
			}
			lastFetching, first = fetching, false
		}
		if up.Complete {
			return nil
		}
		// The fetching list goes out with the pieces, not polled on its
		// own: a poll sent every child an update each time a parent's list
		// moved, which at 1,000 simulated nodes left none done at twice
		// the bound (docs/benchmarks/notebook.md). It only breaks ties in the
		// child's choice, so a list one piece stale costs little.
		select {
		case <-stream.Context().Done():
			return nil
		case <-changed:
		}
		if snap, changed, ok = s.opts.Source.Snapshot(stream.Context(), d); !ok {
			return status.Errorf(codes.Unavailable, "%s: download stopped here", d)
		}
		if len(sent) != len(snap.Done) {
			return status.Errorf(codes.Aborted, "%s: piece plan changed", d)
		}
	}
}
