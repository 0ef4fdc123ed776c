// Package collector fetches the pieces of a blob from its parents: the peers
// that have them and, as the parent of last resort, the upstream registry.
//
// The run knows which pieces each parent announced. In "state" mode a parent
// is chosen by weighted random choice on its host state (spare upload
// bandwidth with a floor, lowered by uploads in flight and a busy disk), and
// of its pieces the best: one the readers need next, else one no other node
// is fetching, then the rarest of the blob. In "fcfs" mode each piece, in
// order, goes to the first parent that announced it. A parent that fails or
// sends bad bytes is blocked for a while and the piece is tried elsewhere; a
// piece coming too slowly is moved to a much faster parent.
package collector

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/internal/pace"
	"github.com/registry-proxy/registry-proxy/metrics"
	"github.com/registry-proxy/registry-proxy/p2p/pb"
	"github.com/registry-proxy/registry-proxy/piece"
)

// Selector names.
const (
	SelectorState = "state"
	SelectorFCFS  = "fcfs"
)

var (
	// ErrExhausted means a piece failed on every attempt.
	ErrExhausted = errors.New("collector: piece failed on every attempt")
	// ErrChecksum means a piece's bytes do not match the checksum its parent
	// announced.
	ErrChecksum = errors.New("collector: piece checksum mismatch")
	// ErrBusy is returned by a parent at its upload limit: back off briefly,
	// it is not a failure.
	ErrBusy = errors.New("collector: parent busy")
	// ErrElsewhere is returned by a parent that already sent this piece to
	// another node and keeps its upload for pieces no one has: take it from
	// a sibling. Not a failure.
	ErrElsewhere = errors.New("collector: parent sent this piece already; fetch it elsewhere")
)

// ElsewhereError is ErrElsewhere with the pieces the parent would send
// instead, as piece.EncodeSet writes them ("" when it did not say). The run
// asks that parent for none of the others for a while.
type ElsewhereError struct{ Offered string }

func (e *ElsewhereError) Error() string { return ErrElsewhere.Error() }
func (e *ElsewhereError) Unwrap() error { return ErrElsewhere }

// Expect is the checksum a parent announced for a piece, if any.
type Expect struct {
	CRC   uint32
	Known bool
}

// Job is the blob being filled, as the collector sees it.
type Job interface {
	Digest() digest.Digest
	Plan() piece.Plan
	// Has reports whether piece i is done.
	Has(i int) bool
	// Put writes piece i from r, checks it (against want when known) and
	// marks it done. source names the parent, for accounting.
	Put(i int, r io.Reader, source string, want Expect) error
	// Next is the piece a reader waits for, or -1 when no reader waits.
	Next() int
}

// Parent is a source of pieces.
type Parent interface {
	ID() string
	// Fetch opens piece i's bytes [off, off+n).
	Fetch(ctx context.Context, i int, off, n int64) (io.ReadCloser, error)
}

// Options configure a Collector.
type Options struct {
	// Concurrency is the number of pieces fetched at once.
	Concurrency int
	// UpstreamConcurrency bounds the pieces fetched from the upstream at
	// once; Concurrency when zero. A run starts with one and doubles it only
	// while that makes the upstream send faster (see probe).
	UpstreamConcurrency int
	// PieceTimeout bounds one piece fetch.
	PieceTimeout time.Duration
	// Attempts is how often one piece may fail from the upstream before the
	// job fails. Failures from peers block the peer instead.
	Attempts int
	// Selector is SelectorState (default) or SelectorFCFS.
	Selector string
	// State returns a parent's host state; ok false when unknown.
	State func(parentID string) (st *pb.HostState, ok bool)
	// BlockFor is how long a failing parent gets no pieces.
	BlockFor time.Duration
	// Window is how many missing pieces ahead of the readers FCFS takes
	// pieces from, in order.
	Window int
	// Urgent is how many missing pieces ahead of the readers the state
	// selector takes first; beyond them it takes the rarest piece of the
	// whole blob.
	Urgent int
	// PerParent bounds the pieces fetched from one peer at once, so one
	// child does not take every upload slot of a parent.
	PerParent int
	// ElsewhereFor is the longest a parent that answered ErrElsewhere for
	// a piece is not asked for it again; a run uses twice its typical peer
	// piece time when that is shorter.
	ElsewhereFor time.Duration
	// StallTimeout lets the upstream send pieces that no peer could send
	// for this long, even where only the owner should go upstream.
	StallTimeout time.Duration
	// MinRate is the slowest a peer may send a piece, bytes/s over each
	// RateWindow; a slower piece is taken away and its parent blocked, so a
	// trickling parent holds a piece for seconds, not PieceTimeout. Zero: no
	// minimum.
	MinRate float64
	// RateWindow is the window MinRate is measured over (5 s by default).
	RateWindow time.Duration
	// RaceAfter is how long a reader waits on a piece a peer is sending
	// before the upstream sends it instead, owner or not; zero: never.
	RaceAfter time.Duration
	// Now is the clock; Rand the random source (tests make both fixed).
	Now    func() time.Time
	Rand   *rand.Rand
	Logger *slog.Logger
	// Download paces every piece this node downloads, from peers and the
	// upstream (download.rate); nil: unpaced.
	Download *pace.Limiter
	// Metrics counts piece fetches; may be nil.
	Metrics *metrics.Metrics
}

// Collector fetches the missing pieces of jobs.
type Collector struct {
	opts   Options
	log    *slog.Logger
	policy policy
	rmu    sync.Mutex // guards opts.Rand
}

// New returns a collector.
func New(opts Options) *Collector {
	if opts.Concurrency <= 0 {
		opts.Concurrency = 8
	}
	if opts.UpstreamConcurrency <= 0 || opts.UpstreamConcurrency > opts.Concurrency {
		opts.UpstreamConcurrency = opts.Concurrency
	}
	if opts.PieceTimeout <= 0 {
		opts.PieceTimeout = time.Minute
	}
	if opts.Attempts <= 0 {
		opts.Attempts = 3
	}
	if opts.Selector == "" {
		opts.Selector = SelectorState
	}
	if opts.BlockFor <= 0 {
		opts.BlockFor = 30 * time.Second
	}
	if opts.Urgent <= 0 {
		opts.Urgent = max(2, opts.Concurrency/4)
	}
	if opts.Window <= 0 {
		opts.Window = 4 * opts.Concurrency
	}
	if opts.PerParent <= 0 {
		opts.PerParent = 4
	}
	if opts.RateWindow <= 0 {
		opts.RateWindow = 5 * time.Second
	}
	if opts.ElsewhereFor <= 0 {
		opts.ElsewhereFor = time.Second
	}
	if opts.StallTimeout <= 0 {
		opts.StallTimeout = 10 * time.Second
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Rand == nil {
		opts.Rand = rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64()))
	}
	if opts.State == nil {
		opts.State = func(string) (*pb.HostState, bool) { return nil, false }
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	return &Collector{opts: opts, log: opts.Logger.With("component", "collector"), policy: policyFor(opts.Selector)}
}

// Collect fetches every missing piece of job from one parent (the upstream,
// for a node without peers).
func (c *Collector) Collect(ctx context.Context, job Job, parent Parent) error {
	r := c.NewRun(job)
	r.SetUpstream(parent, true)
	return r.Run(ctx)
}

func (c *Collector) float64() float64 {
	c.rmu.Lock()
	defer c.rmu.Unlock()
	return c.opts.Rand.Float64()
}
