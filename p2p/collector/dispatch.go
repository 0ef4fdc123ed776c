package collector

// Dispatch: the workers that pick a (piece, parent) and fetch it.

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/registry-proxy/registry-proxy/metrics"
)

// Run fetches until every piece is done, a piece fails every attempt, or
// ctx ends.
func (r *Run) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	defer r.closeUpstream(nil)
	var wg sync.WaitGroup
	for w := 0; w < min(r.c.opts.Concurrency, r.n); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := r.worker(ctx); err != nil {
				cancel(err)
			}
		}()
	}
	wg.Wait()
	if err := context.Cause(ctx); err != nil {
		return err
	}
	for i := 0; i < r.n; i++ {
		if !r.job.Has(i) {
			return fmt.Errorf("collector: piece %d missing after collection", i)
		}
	}
	return nil
}

// Idle workers wait for one wake-up: a token (capacity one) that every
// change leaves (an announcement of a wanted piece, a finished piece, a
// policy change) and that a worker that found work passes on, so one idle
// worker looks per change, and a burst of changes while it looks costs one
// more look, not one per worker. A worker woken by a change looks at most
// once per idleCoalesce, with what else arrived by then (the next
// announcements of a burst); one woken by a worker that found work looks
// at once.
// idleTick bounds the wait, for what time alone changes: refusals and
// blocks that end, a stall, a slow piece to move.
const (
	idleTick     = 250 * time.Millisecond
	idleCoalesce = 10 * time.Millisecond
)

func (r *Run) worker(ctx context.Context) error {
	timer := time.NewTimer(idleTick)
	defer timer.Stop()
	// Whoever leaves passes the turn on, so idle workers see the end too.
	defer r.wakeOne()
	for {
		// A cancelled run stops here: its fetches would fail at once and
		// the loop would spin.
		if ctx.Err() != nil {
			return nil
		}
		r.mu.Lock()
		looked := time.Now()
		i, pq, done := r.pickLocked()
		if pq == nil && !done {
			// Nothing any parent may send now: take a piece away from a
			// parent too slow to send it, then wait.
			r.stealLocked()
		}
		r.mu.Unlock()
		if done {
			return nil
		}
		if pq == nil {
			timer.Reset(idleTick)
			select {
			case <-ctx.Done():
				return nil
			case <-r.wake:
				r.mu.Lock()
				// Nothing left to wait for: look at once (and leave).
				changed := r.changed && r.nwanted > 0
				r.changed = false
				r.mu.Unlock()
				if d := idleCoalesce - time.Since(looked); changed && d > 0 {
					timer.Reset(d)
					select {
					case <-ctx.Done():
						return nil
					case <-timer.C:
					}
				}
			case <-timer.C:
			}
			continue
		}
		// There may be more: let an idle worker look.
		r.wakeOne()
		began := r.c.opts.Now()
		err := r.fetch(ctx, i, pq)
		took := r.c.opts.Now().Sub(began)
		r.c.opts.Metrics.Piece(parentKind(pq), pieceResult(ctx, err), took)
		if err := r.finish(ctx, i, pq, took, err); err != nil {
			return err
		}
	}
}

func parentKind(pq *parentQueue) string {
	if pq.upstream {
		return metrics.SourceUpstream
	}
	return metrics.SourcePeer
}

// pieceResult names a fetch's outcome for the metrics.
func pieceResult(ctx context.Context, err error) string {
	switch {
	case err == nil:
		return "ok"
	case errors.Is(err, ErrBusy):
		return "busy"
	case errors.Is(err, errTooSlow):
		return "slow"
	case errors.Is(err, errRaced):
		return "raced"
	case errors.Is(err, ErrElsewhere), errors.Is(err, errStolen):
		return "elsewhere"
	case ctx.Err() != nil:
		return "cancelled"
	}
	return "failed"
}

// wakeOne leaves the wake-up token, unless one is waiting already.
func (r *Run) wakeOne() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// pickLocked chooses the next piece and parent. done means nothing is left
// to pick; a nil parent means wait.
func (r *Run) pickLocked() (int, *parentQueue, bool) {
	if r.nwanted == 0 {
		// All done, or in flight with workers that finish it; a worker
		// stays while a peer fetch runs, to move it if it is too slow.
		return 0, nil, !r.peerFetchingLocked()
	}
	now := r.c.opts.Now()
	// A piece a reader waited on too long comes from the upstream, first.
	for len(r.raced) > 0 && r.upstream != nil && r.upstream.inflight < r.c.opts.UpstreamConcurrency {
		i := r.raced[0]
		r.raced = r.raced[1:]
		if r.wanted[i] {
			r.takeLocked(i, r.upstream)
			return i, r.upstream, false
		}
	}
	upstreamRoom := r.upstream != nil && r.upstream.inflight < r.upstream.probe.room(r.c.opts.UpstreamConcurrency)
	// Pieces delegated to this node come from the upstream first: no peer
	// has them before it does.
	if upstreamRoom && r.granted != nil {
		if i, ok := r.firstWantedLocked(func(i int) bool { return r.granted[i] }); ok {
			r.takeLocked(i, r.upstream)
			return i, r.upstream, false
		}
	}
	i, pq, win := r.c.policy.pick(r, now)
	stalled := now.Sub(r.progress) > r.c.opts.StallTimeout
	if pq == nil && upstreamRoom && (r.allowUpstream || len(r.parents) == 0 || stalled) {
		ok := true
		switch {
		case r.denied != nil && !stalled:
			i, ok = r.firstWantedLocked(func(i int) bool { return !r.denied[i] })
		case win != nil:
			i = win[0]
		default:
			i = r.windowLocked(1)[0]
		}
		if ok {
			if stalled && !r.allowUpstream {
				r.c.log.Warn("no peer sent a piece in time; taking it from the upstream", "digest", r.job.Digest(), "piece", i, "stalled", now.Sub(r.progress).Round(time.Millisecond))
			}
			pq = r.upstream
		}
	}
	if pq != nil {
		r.takeLocked(i, pq)
	}
	return i, pq, false
}

// takeLocked hands piece i to parent pq: in flight, no longer wanted.
func (r *Run) takeLocked(i int, pq *parentQueue) {
	r.inflight = append(r.inflight, i)
	r.setWantedLocked(i, false)
	pq.inflight++
	if pq.upstream {
		pq.probe.picked(r.c.opts.Now())
	}
}

// peerFetchingLocked reports whether a peer fetch is in flight: picked
// already, though its worker may not have registered it in fetches yet (a
// worker leaving in that window left no one to move a slow piece).
func (r *Run) peerFetchingLocked() bool {
	if len(r.fetches) > 0 {
		return true
	}
	for _, pq := range r.order {
		if pq.inflight > 0 {
			return true
		}
	}
	return false
}
