package statesync

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"

	"github.com/registry-proxy/registry-proxy/p2p/pb"
)

// Dial opens a SyncHost client to a parent's address; release frees it.
type Dial func(ctx context.Context, addr string) (client pb.HostSyncClient, release func(), err error)

// SyncerOptions configure a Syncer.
type SyncerOptions struct {
	// HostID is this host, sent to parents.
	HostID string
	Dial   Dial
	// Interval is the parents' send interval; a state older than three of
	// them is unknown.
	Interval time.Duration
	// Capacity is the most parents followed at once (50 in the RFC).
	Capacity int
	// Now is the clock; time.Now when nil.
	Now    func() time.Time
	Logger *slog.Logger
}

// Syncer follows parents' host state.
type Syncer struct {
	opts   SyncerOptions
	log    *slog.Logger
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex
	parents *lru.Cache[string, *follower]
}

type follower struct {
	id, addr string
	cancel   context.CancelFunc

	mu       sync.Mutex
	host     *pb.Host
	received time.Time
}

// NewSyncer returns a syncer; Close stops it.
func NewSyncer(opts SyncerOptions) *Syncer {
	if opts.Interval <= 0 {
		opts.Interval = 3 * time.Second
	}
	if opts.Capacity <= 0 {
		opts.Capacity = 50
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Syncer{opts: opts, log: opts.Logger.With("component", "statesync-syncer"), ctx: ctx, cancel: cancel}
	s.parents, _ = lru.NewWithEvict(opts.Capacity, func(_ string, f *follower) { f.cancel() })
	return s
}

// Follow starts following a parent, or marks it recently used. When more
// than Capacity parents are followed, the least recently used is dropped.
func (s *Syncer) Follow(id, addr string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ctx.Err() != nil {
		return
	}
	if f, ok := s.parents.Get(id); ok {
		if f.addr == addr {
			return
		}
		s.parents.Remove(id) // moved: follow the new address
	}
	ctx, cancel := context.WithCancel(s.ctx)
	f := &follower{id: id, addr: addr, cancel: cancel}
	s.parents.Add(id, f)
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.follow(ctx, f)
	}()
}

// Parents lists the ids of the parents followed.
func (s *Syncer) Parents() []string { return s.parents.Keys() }

// Following is the number of parents followed.
func (s *Syncer) Following() int { return s.parents.Len() }

// State returns a parent's latest state and its age. ok is false when the
// parent is not followed, has sent nothing yet, or its state is older than
// three intervals.
func (s *Syncer) State(id string) (state *pb.HostState, age time.Duration, ok bool) {
	f, found := s.parents.Peek(id)
	if !found {
		return nil, 0, false
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.host == nil {
		return nil, 0, false
	}
	age = s.opts.Now().Sub(f.received)
	if age > 3*s.opts.Interval {
		return nil, age, false
	}
	return f.host.GetState(), age, true
}

// Close stops following every parent and waits.
func (s *Syncer) Close() {
	s.mu.Lock()
	s.cancel()
	s.mu.Unlock()
	s.wg.Wait()
}

// follow keeps one stream to a parent, reconnecting with backoff.
func (s *Syncer) follow(ctx context.Context, f *follower) {
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		got, err := s.stream(ctx, f)
		if ctx.Err() != nil {
			return
		}
		if got {
			backoff = 100 * time.Millisecond
		}
		s.log.Debug("host state stream ended", "parent", f.id, "addr", f.addr, "err", err)
		wait := backoff + rand.N(backoff/2+1)
		backoff = min(backoff*2, 10*time.Second)
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

// stream runs one SyncHost stream; got says whether any state arrived.
func (s *Syncer) stream(ctx context.Context, f *follower) (got bool, err error) {
	client, release, err := s.opts.Dial(ctx, f.addr)
	if err != nil {
		return false, err
	}
	defer release()
	st, err := client.SyncHost(ctx, &pb.SyncHostRequest{HostId: s.opts.HostID, PeerId: f.id})
	if err != nil {
		return false, err
	}
	for {
		h, err := st.Recv()
		if errors.Is(err, io.EOF) {
			return got, err
		}
		if err != nil {
			return got, err
		}
		got = true
		f.mu.Lock()
		f.host, f.received = h, s.opts.Now()
		f.mu.Unlock()
	}
}
