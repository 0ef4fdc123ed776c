package collector

// Slow pieces: moved to a faster parent, or to the upstream when a reader waits.

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"
)

// fetchState is one piece fetch in flight, watched for being too slow.
type fetchState struct {
	pq     *parentQueue
	start  time.Time
	size   int64
	read   atomic.Int64
	cancel context.CancelCauseFunc
}

// errStolen cancels a fetch whose piece another parent will send sooner.
var errStolen = errors.New("collector: piece moved to a faster parent")

// errTooSlow cancels a fetch from a parent sending below MinRate.
var errTooSlow = errors.New("collector: parent below the minimum rate")

// errRaced cancels a peer fetch of the piece a reader waits on that took
// longer than RaceAfter: the upstream sends it instead.
var errRaced = errors.New("collector: reader waited too long; piece taken from the upstream")

// watchFetch watches a peer fetch: it cancels it with errTooSlow when fewer
// than MinRate bytes/s arrived over a RateWindow, and with errRaced when a
// reader has waited on its piece for RaceAfter. The returned func stops it
// and waits.
func (r *Run) watchFetch(ctx context.Context, i int, fs *fetchState) (stop func()) {
	o := r.c.opts
	if o.MinRate <= 0 && o.RaceAfter <= 0 {
		return func() {}
	}
	tick := o.RateWindow
	if o.RaceAfter > 0 {
		tick = min(tick, max(o.RaceAfter/4, 10*time.Millisecond))
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		t := time.NewTicker(tick)
		defer t.Stop()
		checked, last := o.Now(), int64(0)
		for {
			select {
			case <-done:
				return
			case <-ctx.Done():
				return
			case <-t.C:
			}
			now, read := o.Now(), fs.read.Load()
			if el := now.Sub(fs.start); o.RaceAfter > 0 && el >= o.RaceAfter && read < fs.size && r.job.Next() == i {
				// Unless what has come so far says the rest comes within
				// another RaceAfter: a busy but moving parent keeps it.
				rate := float64(read) / el.Seconds()
				if rate <= 0 || float64(fs.size-read)/rate > o.RaceAfter.Seconds() {
					fs.cancel(errRaced)
					return
				}
			}
			if o.MinRate > 0 && now.Sub(checked) >= o.RateWindow {
				if float64(read-last) < o.MinRate*now.Sub(checked).Seconds() && read < fs.size {
					fs.cancel(errTooSlow)
					return
				}
				checked, last = now, read
			}
		}
	})
	return func() { close(done); wg.Wait() }
}

// Stealing thresholds: a fetch is left alone for its first second, and
// moved only when it would need more than two more seconds and another
// parent offering the piece looks at least three times faster.
const (
	stealAfter     = time.Second
	stealRemaining = 2 * time.Second
	stealFactor    = 3
)

// stealLocked cancels a peer fetch in flight that another available parent
// could send much sooner; the piece goes back to the window, and the slow
// parent refuses it for a while, so the faster one gets it. A piece moves
// once: the weights are estimates, and two parents each looking faster
// than the other's actual rate (a slow parent's upload split among several
// children) took the piece from each other every second, each time from
// its first byte, for good.
func (r *Run) stealLocked() {
	now := r.c.opts.Now()
	for i, fs := range r.fetches {
		elapsed := now.Sub(fs.start)
		if elapsed < stealAfter || r.moved[i] {
			continue
		}
		read := fs.read.Load()
		rate := float64(read) / elapsed.Seconds()
		if rate > 0 && time.Duration(float64(fs.size-read)/rate*float64(time.Second)) < stealRemaining {
			continue
		}
		for _, q := range r.order {
			if q == fs.pq || !r.available(q, now) || !r.offers(q, i, now) {
				continue
			}
			if r.weightLocked(q) >= stealFactor*max(rate, 1) {
				r.c.log.Debug("moving a slow piece to another parent", "digest", r.job.Digest(), "piece", i,
					"from", fs.pq.p.ID(), "to", q.p.ID(), "rate", int64(rate))
				r.refuse(fs.pq, i, now.Add(r.c.opts.ElsewhereFor))
				fs.cancel(errStolen)
				delete(r.fetches, i)
				r.moved[i] = true
				return
			}
		}
	}
}
