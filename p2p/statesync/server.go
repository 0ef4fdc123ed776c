// Package statesync carries host state from parents to children, as
// Dragonfly's RFC #3713 describes: the Server (ParentStateServer) streams this
// host's state to every subscribed child each interval, holding at most
// capacity subscribers in an LRU; the Syncer (ParentStateSyncer) follows the
// parents the collector uses, at most capacity of them, and holds each one's
// latest state.
package statesync

import (
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/registry-proxy/registry-proxy/p2p/pb"
	"github.com/registry-proxy/registry-proxy/p2p/trust"
)

// ServerOptions configure a Server.
type ServerOptions struct {
	// Self returns this host's identity and latest state.
	Self func() *pb.Host
	// Interval between two states sent to a subscriber (3 s in the RFC).
	Interval time.Duration
	// Capacity is the most subscribers held at once (50 in the RFC).
	Capacity int
	Logger   *slog.Logger
}

// Server is the SyncHost service.
type Server struct {
	pb.UnimplementedHostSyncServer
	opts ServerOptions
	log  *slog.Logger

	mu   sync.Mutex
	subs *lru.Cache[string, *subscriber]
}

type subscriber struct {
	stop chan error // receives the status that ends the stream
	once sync.Once
}

func (s *subscriber) close(err error) {
	s.once.Do(func() { s.stop <- err })
}

// NewServer returns a SyncHost server.
func NewServer(opts ServerOptions) *Server {
	if opts.Interval <= 0 {
		opts.Interval = 3 * time.Second
	}
	if opts.Capacity <= 0 {
		opts.Capacity = 50
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	s := &Server{opts: opts, log: opts.Logger.With("component", "statesync-server")}
	s.subs, _ = lru.NewWithEvict(opts.Capacity, func(id string, sub *subscriber) {
		sub.close(status.Errorf(codes.ResourceExhausted, "host state subscribers at capacity %d: %s evicted as least recently subscribed", opts.Capacity, id))
	})
	return s
}

// Subscribers is the number of children subscribed now.
func (s *Server) Subscribers() int { return s.subs.Len() }

// SyncHost implements pb.HostSyncServer.
func (s *Server) SyncHost(req *pb.SyncHostRequest, stream pb.HostSync_SyncHostServer) error {
	if req.GetHostId() == "" {
		return status.Error(codes.InvalidArgument, "host_id is required")
	}
	// A member subscribes as itself only: it cannot push others out of the LRU.
	caller, err := trust.Caller(stream.Context(), req.GetHostId())
	if errors.Is(err, trust.ErrNotSelf) {
		return status.Error(codes.PermissionDenied, err.Error())
	}
	self := s.opts.Self()
	if req.GetPeerId() != "" && req.GetPeerId() != self.GetId() {
		return status.Errorf(codes.FailedPrecondition, "this is host %q, not %q", self.GetId(), req.GetPeerId())
	}
	// A debugging client (a read-only certificate for a member's name)
	// holds a subscription of its own: it does not replace the member's.
	key := req.HostId
	if caller.ReadOnly {
		key += " (read-only)"
	}
	sub := &subscriber{stop: make(chan error, 1)}
	s.mu.Lock()
	if old, ok := s.subs.Peek(key); ok {
		old.close(status.Error(codes.Aborted, "replaced by a newer subscription of the same host"))
		s.subs.Remove(key)
	}
	s.subs.Add(key, sub)
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		if cur, ok := s.subs.Peek(key); ok && cur == sub {
			s.subs.Remove(key)
		}
		s.mu.Unlock()
	}()

	t := time.NewTicker(s.opts.Interval)
	defer t.Stop()
	for {
		if err := stream.Send(s.opts.Self()); err != nil {
			return fmt.Errorf("statesync: send to %s: %w", req.HostId, err)
		}
		select {
		case <-stream.Context().Done():
			return nil
		case err := <-sub.stop:
			s.log.Debug("host state subscriber closed", "host", req.HostId, "reason", err)
			return err
		case <-t.C:
		}
	}
}
