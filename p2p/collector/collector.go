// Package collector fetches the pieces of a blob from its parents: the peers
// that have them and, as the parent of last resort, the upstream registry.
package collector

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/piece"
)

// ErrWhole is returned by a parent that answered a piece request with the
// whole blob (an upstream that ignores Range). The body is in the error.
type ErrWhole struct{ Body io.ReadCloser }

func (e *ErrWhole) Error() string { return "collector: parent sent the whole blob" }

// ErrExhausted means a piece failed on every attempt.
var ErrExhausted = errors.New("collector: piece failed on every attempt")

// Job is the blob being filled, as the collector sees it.
type Job interface {
	Digest() digest.Digest
	Plan() piece.Plan
	// Has reports whether piece i is done.
	Has(i int) bool
	// Put writes piece i from r, checks it and marks it done. source names
	// the parent, for accounting.
	Put(i int, r io.Reader, source string) error
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
	// PieceTimeout bounds one piece fetch.
	PieceTimeout time.Duration
	// Attempts is how often one piece is tried before the job fails.
	Attempts int
	Logger   *slog.Logger
}

// Collector fetches the missing pieces of a job in parallel from a parent,
// the pieces readers are waiting on first.
type Collector struct {
	opts Options
	log  *slog.Logger
}

// New returns a collector.
func New(opts Options) *Collector {
	if opts.Concurrency <= 0 {
		opts.Concurrency = 8
	}
	if opts.PieceTimeout <= 0 {
		opts.PieceTimeout = time.Minute
	}
	if opts.Attempts <= 0 {
		opts.Attempts = 3
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	return &Collector{opts: opts, log: opts.Logger.With("component", "collector")}
}

// run is the state of one Collect call.
type run struct {
	c      *Collector
	job    Job
	parent Parent

	mu         sync.Mutex
	inflight   []bool
	failures   []int
	sequential bool // a parent sent the whole blob; one stream fills the rest
}

// Collect fetches every missing piece of job from parent. It returns when all
// pieces are done, a piece failed every attempt, or ctx ends.
func (c *Collector) Collect(ctx context.Context, job Job, parent Parent) error {
	n := job.Plan().Count()
	r := &run{c: c, job: job, parent: parent, inflight: make([]bool, n), failures: make([]int, n)}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)

	var wg sync.WaitGroup
	for w := 0; w < min(c.opts.Concurrency, n); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := r.worker(ctx, cancel); err != nil {
				cancel(err)
			}
		}()
	}
	wg.Wait()
	if err := context.Cause(ctx); err != nil && !errors.Is(err, errAllDone) {
		return err
	}
	for i := 0; i < n; i++ {
		if !job.Has(i) {
			return fmt.Errorf("collector: piece %d missing after collection", i)
		}
	}
	return nil
}

var errAllDone = errors.New("all pieces done")

func (r *run) worker(ctx context.Context, cancel context.CancelCauseFunc) error {
	for {
		i, ok := r.pick()
		if !ok {
			return nil
		}
		err := r.fetch(ctx, i)
		var whole *ErrWhole
		if errors.As(err, &whole) {
			// The parent can't do ranges: one sequential stream fills
			// everything, the other workers stop.
			r.mu.Lock()
			first := !r.sequential
			r.sequential = true
			r.mu.Unlock()
			if !first {
				whole.Body.Close()
				return nil
			}
			err = r.streamWhole(whole.Body)
			if err == nil {
				cancel(errAllDone)
			}
			return err
		}
		r.mu.Lock()
		r.inflight[i] = false
		if err != nil {
			r.failures[i]++
			if ctx.Err() != nil {
				r.mu.Unlock()
				return nil
			}
			if r.failures[i] >= r.c.opts.Attempts {
				r.mu.Unlock()
				return fmt.Errorf("%w: piece %d of %s from %s: %w", ErrExhausted, i, r.job.Digest(), r.parent.ID(), err)
			}
			r.c.log.Warn("piece failed, retrying", "digest", r.job.Digest(), "piece", i, "parent", r.parent.ID(), "attempt", r.failures[i], "err", err)
		}
		r.mu.Unlock()
	}
}

// pick returns the next piece to fetch: the first missing, idle piece at or
// after the one a reader waits for, wrapping around.
func (r *run) pick() (int, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := len(r.inflight)
	if r.sequential {
		return 0, false
	}
	start := r.job.Next()
	if start < 0 || start >= n {
		start = 0
	}
	for k := 0; k < n; k++ {
		i := (start + k) % n
		if !r.inflight[i] && !r.job.Has(i) {
			r.inflight[i] = true
			return i, true
		}
	}
	return 0, false
}

func (r *run) fetch(ctx context.Context, i int) error {
	ctx, cancel := context.WithCancel(ctx)
	timer := time.AfterFunc(r.c.opts.PieceTimeout, cancel)
	off, n := r.job.Plan().Range(i)
	body, err := r.parent.Fetch(ctx, i, off, n)
	var whole *ErrWhole
	if errors.As(err, &whole) {
		// The whole blob streams for as long as it takes; its reader
		// releases the request.
		timer.Stop()
		whole.Body = &cancelOnClose{ReadCloser: whole.Body, cancel: cancel}
		return err
	}
	defer cancel()
	defer timer.Stop()
	if err != nil {
		return err
	}
	defer body.Close()
	return r.job.Put(i, io.LimitReader(body, n+1), r.parent.ID())
}

type cancelOnClose struct {
	io.ReadCloser
	cancel context.CancelFunc
}

func (c *cancelOnClose) Close() error {
	err := c.ReadCloser.Close()
	c.cancel()
	return err
}

// streamWhole fills every missing piece from a body that holds the whole blob.
func (r *run) streamWhole(body io.ReadCloser) error {
	defer body.Close()
	plan := r.job.Plan()
	for i := 0; i < plan.Count(); i++ {
		_, n := plan.Range(i)
		if r.job.Has(i) {
			if _, err := io.CopyN(io.Discard, body, n); err != nil {
				return fmt.Errorf("collector: whole blob from %s: %w", r.parent.ID(), err)
			}
			continue
		}
		if err := r.job.Put(i, io.LimitReader(body, n), r.parent.ID()); err != nil {
			return fmt.Errorf("collector: whole blob from %s: %w", r.parent.ID(), err)
		}
	}
	return nil
}
