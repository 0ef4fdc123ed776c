package collector

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/registry-proxy/registry-proxy/metrics"
	"github.com/registry-proxy/registry-proxy/p2p/pb"
)

// parentQueue is what the run knows of one parent.
type parentQueue struct {
	p        Parent
	upstream bool
	has      []bool      // per piece: announced
	list     []int       // the announced pieces, in the order announced
	crc      []uint32    // per piece: announced checksum
	fetching []bool      // per piece: the parent itself is fetching it now
	offering int         // pieces it has that this node wants (refusals aside)
	blocked  time.Time   // no pieces before this
	refused  []time.Time // per piece: not asked again before this (ErrElsewhere); nil until the first refusal
	inflight int
	picks    int
	bytes    int64
	// measured is the rate its last pieces came at (bytes/s, a moving
	// average); 0 until one came. What it reports never counts for more.
	measured float64
}

// measuredFactor bounds a parent's weight by what this node measured from
// it: a parent's own report of spare bandwidth is believed up to this many
// times the rate its pieces actually came at.
const measuredFactor = 4

// weightLocked is pq's selection weight: its host state, capped by what
// this node measured from it.
func (r *Run) weightLocked(pq *parentQueue) float64 {
	st, ok := r.c.opts.State(pq.p.ID())
	w := Weight(st, ok)
	if pq.measured > 0 {
		w = min(w, measuredFactor*pq.measured)
	}
	return w
}

// Run is the collection of one blob. Parents and their announcements may be
// added while it runs.
type Run struct {
	c   *Collector
	job Job
	n   int

	mu            sync.Mutex
	changed       chan struct{}
	watching      bool          // an idle worker waits on changed
	parked        chan struct{} // wakes one parked idle worker
	parents       map[string]*parentQueue
	order         []*parentQueue // parents in the order added
	upstream      *parentQueue
	allowUpstream bool
	raced         []int // pieces readers waited on too long: from the upstream next
	// authority is the parent whose piece checksums are trusted (the
	// digest's owner, which read them from the upstream): a piece from any
	// parent is checked against them, not against what its sender says.
	authority   string
	trusted     []uint32
	trustedSeen []bool
	firstHolder []string // per piece: first parent that announced it (FCFS)
	holders     []int    // per piece: parents that have it
	fetchers    []int    // per piece: parents fetching it
	wanted      []bool   // per piece: not done and not in flight
	nwanted     int
	wantedList  []int // the wanted pieces, in no order
	wantedPos   []int // per piece: its index in wantedList, or -1
	inflight    []bool
	fetches     map[int]*fetchState // peer fetches in flight
	failures    []int
	sequential  bool
	progress    time.Time // last piece done by a peer
}

// NewRun starts the bookkeeping of a blob; Run fetches.
func (c *Collector) NewRun(job Job) *Run {
	n := job.Plan().Count()
	r := &Run{
		c: c, job: job, n: n,
		progress:    c.opts.Now(),
		changed:     make(chan struct{}),
		parked:      make(chan struct{}, 1),
		parents:     map[string]*parentQueue{},
		firstHolder: make([]string, n),
		holders:     make([]int, n),
		fetchers:    make([]int, n),
		wanted:      make([]bool, n),
		wantedPos:   make([]int, n),
		inflight:    make([]bool, n),
		fetches:     map[int]*fetchState{},
		failures:    make([]int, n),
		trusted:     make([]uint32, n),
		trustedSeen: make([]bool, n),
	}
	for i := range n {
		r.wantedPos[i] = -1
		if !job.Has(i) {
			r.wanted[i] = true
			r.nwanted++
			r.wantedPos[i] = len(r.wantedList)
			r.wantedList = append(r.wantedList, i)
		}
	}
	return r
}

func (r *Run) broadcastLocked() {
	close(r.changed)
	r.changed = make(chan struct{})
}

// SetUpstream sets the parent of last resort, and whether it may be used now.
func (r *Run) SetUpstream(p Parent, allowed bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.upstream = &parentQueue{p: p, upstream: true}
	r.allowUpstream = allowed
	r.broadcastLocked()
}

// AllowUpstream lets pieces no peer has come from the upstream (or stops it).
func (r *Run) AllowUpstream(allowed bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.allowUpstream = allowed
	r.broadcastLocked()
}

// UpstreamAllowed reports whether pieces may come from the upstream now.
func (r *Run) UpstreamAllowed() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.allowUpstream
}

// AddParent adds a peer parent with no pieces yet.
func (r *Run) AddParent(p Parent) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.parents[p.ID()]; ok {
		return
	}
	pq := &parentQueue{p: p, has: make([]bool, r.n), crc: make([]uint32, r.n), fetching: make([]bool, r.n)}
	r.parents[p.ID()] = pq
	r.order = append(r.order, pq)
}

// RemoveParent forgets a parent (it left, or its stream ended).
func (r *Run) RemoveParent(id string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if pq, ok := r.parents[id]; ok {
		for i := range r.n {
			if pq.has[i] {
				r.holders[i]--
			}
			if pq.fetching[i] {
				r.fetchers[i]--
			}
		}
	}
	delete(r.parents, id)
	for i, o := range r.order {
		if o.p.ID() == id {
			r.order = append(r.order[:i:i], r.order[i+1:]...)
			break
		}
	}
	r.broadcastLocked()
}

// Announce records pieces a parent has (with checksums) and the pieces it is
// fetching now (replacing its previous list when fetching is not nil).
func (r *Run) Announce(id string, has map[int]uint32, fetching []int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	pq, ok := r.parents[id]
	if !ok {
		return
	}
	var fresh []int
	for i, crc := range has {
		if i < 0 || i >= r.n {
			continue
		}
		if !pq.has[i] {
			fresh = append(fresh, i)
			pq.has[i] = true
			pq.list = append(pq.list, i)
			r.holders[i]++
			if r.wanted[i] {
				pq.offering++
			}
		}
		pq.crc[i] = crc
		if id == r.authority {
			r.trusted[i], r.trustedSeen[i] = crc, true
		}
		if pq.fetching[i] {
			pq.fetching[i] = false
			r.fetchers[i]--
		}
	}
	sort.Ints(fresh) // one announcement's pieces are first held in index order
	wanted := false
	for _, i := range fresh {
		if r.firstHolder[i] == "" {
			r.firstHolder[i] = id
		}
		wanted = wanted || !r.job.Has(i)
	}
	if fetching != nil {
		now := make([]bool, r.n)
		for _, i := range fetching {
			if i >= 0 && i < r.n && !pq.has[i] {
				now[i] = true
			}
		}
		for i := range r.n {
			if now[i] != pq.fetching[i] {
				if now[i] {
					r.fetchers[i]++
				} else {
					r.fetchers[i]--
				}
			}
		}
		pq.fetching = now
	}
	// Workers only care about pieces this node still needs; waking them
	// for the rest costs a cluster's worth of announcements.
	if wanted {
		r.broadcastLocked()
	}
}

// AnnounceComplete records that a parent holds the whole, verified blob,
// with the checksum of every piece: it offers every piece.
func (r *Run) AnnounceComplete(id string, crcs map[int]uint32) {
	r.Announce(id, crcs, []int{})
}

// SetAuthority names the parent whose piece checksums every piece is
// checked against: the digest's owner. Its announcements so far and from
// now on are trusted.
func (r *Run) SetAuthority(id string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.authority == id {
		return
	}
	r.authority = id
	for i := range r.trustedSeen {
		r.trustedSeen[i] = false
	}
	if pq, ok := r.parents[id]; ok {
		for i, has := range pq.has {
			if has {
				r.trusted[i], r.trustedSeen[i] = pq.crc[i], true
			}
		}
	}
}

// Picks returns how many pieces and bytes came from each parent so far.
func (r *Run) Picks() map[string]int {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := map[string]int{}
	for id, pq := range r.parents {
		out[id] = pq.picks
	}
	if r.upstream != nil {
		out[r.upstream.p.ID()] += r.upstream.picks
	}
	return out
}

// Weights returns each peer parent's current selection weight.
func (r *Run) Weights() map[string]float64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := map[string]float64{}
	for id, pq := range r.parents {
		out[id] = r.weightLocked(pq)
	}
	return out
}

// InFlight returns the pieces being fetched now, for this node's own
// announcements.
func (r *Run) InFlight() []int {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []int
	for i, f := range r.inflight {
		if f {
			out = append(out, i)
		}
	}
	return out
}

var errAllDone = errors.New("all pieces done")

// Run fetches until every piece is done, a piece fails every attempt, or
// ctx ends.
func (r *Run) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var wg sync.WaitGroup
	for w := 0; w < min(r.c.opts.Concurrency, r.n); w++ {
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
	for i := 0; i < r.n; i++ {
		if !r.job.Has(i) {
			return fmt.Errorf("collector: piece %d missing after collection", i)
		}
	}
	return nil
}

// Idle workers: one watches for changes (announcements, finished pieces,
// policy) and re-checks every idleTick; the others park until a worker that
// found work wakes the next one. Every worker re-checking on every change
// costs a cluster's worth of announcements times the workers.
// The watcher re-checks at most every idleCoalesce, so a burst of
// announcements costs one look.
const (
	idleTick     = 250 * time.Millisecond
	idleCoalesce = 10 * time.Millisecond
)

func (r *Run) worker(ctx context.Context, cancel context.CancelCauseFunc) error {
	timer := time.NewTimer(idleTick)
	defer timer.Stop()
	// Whoever leaves passes the turn on, so parked workers see the end too.
	defer r.wakeOne()
	for {
		// A cancelled run stops here: its fetches would fail at once and
		// the loop would spin.
		if ctx.Err() != nil {
			return nil
		}
		r.mu.Lock()
		i, pq, done := r.pickLocked()
		ch := r.changed
		watch := false
		if pq == nil && !done {
			// Nothing any parent may send now: take a piece away from a
			// parent too slow to send it, then wait.
			r.stealLocked()
			if !r.watching {
				r.watching, watch = true, true
			}
		}
		r.mu.Unlock()
		if done {
			return nil
		}
		if pq == nil {
			timer.Reset(idleTick)
			if watch {
				looked := time.Now()
				select {
				case <-ctx.Done():
				case <-ch:
					r.mu.Lock()
					finished := r.nwanted == 0 && !r.peerFetchingLocked()
					r.mu.Unlock()
					if d := idleCoalesce - time.Since(looked); d > 0 && !finished {
						timer.Reset(d)
						select {
						case <-ctx.Done():
						case <-timer.C:
						}
					}
				case <-timer.C:
				}
				r.mu.Lock()
				r.watching = false
				r.mu.Unlock()
			} else {
				select {
				case <-ctx.Done():
				case <-r.parked:
				case <-timer.C: // a safety net; the watcher wakes parked workers
				}
			}
			if ctx.Err() != nil {
				return nil
			}
			continue
		}
		// There may be more: let a parked worker look.
		r.wakeOne()
		began := r.c.opts.Now()
		err := r.fetch(ctx, i, pq)
		r.c.opts.Metrics.Piece(parentKind(pq), pieceResult(ctx, err), r.c.opts.Now().Sub(began))
		var whole *ErrWhole
		if errors.As(err, &whole) {
			return r.streamWhole(whole, pq, cancel)
		}
		if err := r.finish(ctx, i, pq, err); err != nil {
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
	var whole *ErrWhole
	switch {
	case err == nil:
		return "ok"
	case errors.As(err, &whole):
		return "whole"
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

func (r *Run) wakeOne() {
	select {
	case r.parked <- struct{}{}:
	default:
	}
}

// finish books the outcome of one fetch.
func (r *Run) finish(ctx context.Context, i int, pq *parentQueue, err error) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.inflight[i] = false
	pq.inflight--
	defer r.broadcastLocked()
	defer func() {
		// A piece not done goes back to the wanted ones.
		r.setWantedLocked(i, !r.job.Has(i))
	}()
	if errors.Is(err, ErrBusy) && !pq.upstream {
		// Backpressure, not failure: leave the parent alone for a moment.
		pq.blocked = r.c.opts.Now().Add(250 * time.Millisecond)
		return nil
	}
	if errors.Is(err, errRaced) && !pq.upstream {
		pq.refuse(i, r.c.opts.Now().Add(r.c.opts.ElsewhereFor))
		r.raced = append(r.raced, i)
		r.c.log.Info("a reader waited on a piece from a peer; taking it from the upstream", "digest", r.job.Digest(), "piece", i,
			"parent", pq.p.ID(), "after", r.c.opts.RaceAfter)
		return nil
	}
	if errors.Is(err, errTooSlow) && !pq.upstream {
		pq.blocked = r.c.opts.Now().Add(r.c.opts.BlockFor)
		r.c.log.Warn("parent sends below the minimum rate; piece moved, parent blocked", "digest", r.job.Digest(), "piece", i,
			"parent", pq.p.ID(), "min_rate", int64(r.c.opts.MinRate), "for", r.c.opts.BlockFor)
		return nil
	}
	if (errors.Is(err, ErrElsewhere) || errors.Is(err, errStolen)) && !pq.upstream {
		pq.refuse(i, r.c.opts.Now().Add(r.c.opts.ElsewhereFor))
		return nil
	}
	if err == nil {
		if !pq.upstream {
			r.progress = r.c.opts.Now()
		}
		pq.picks++
		_, n := r.job.Plan().Range(i)
		pq.bytes += n
		return nil
	}
	if ctx.Err() != nil {
		return nil
	}
	if !pq.upstream {
		pq.blocked = r.c.opts.Now().Add(r.c.opts.BlockFor)
		r.c.log.Warn("piece failed, blocking parent", "digest", r.job.Digest(), "piece", i, "parent", pq.p.ID(), "for", r.c.opts.BlockFor, "err", err)
		return nil
	}
	r.failures[i]++
	if r.failures[i] >= r.c.opts.Attempts {
		return fmt.Errorf("%w: piece %d of %s from %s: %w", ErrExhausted, i, r.job.Digest(), pq.p.ID(), err)
	}
	r.c.log.Warn("piece failed, retrying", "digest", r.job.Digest(), "piece", i, "parent", pq.p.ID(), "attempt", r.failures[i], "err", err)
	return nil
}

// windowLocked returns up to limit wanted pieces from the readers' cursor
// on (wrapping), in order.
func (r *Run) windowLocked(limit int) (win []int) {
	start := r.cursor()
	for k := 0; k < r.n && len(win) < limit; k++ {
		if i := (start + k) % r.n; r.wanted[i] {
			win = append(win, i)
		}
	}
	return win
}

func (r *Run) cursor() int {
	if start := r.job.Next(); start >= 0 && start < r.n {
		return start
	}
	return 0
}

// pickLocked chooses the next piece and parent. done means nothing is left
// to pick; a nil parent means wait.
func (r *Run) pickLocked() (int, *parentQueue, bool) {
	if r.sequential {
		return 0, nil, true
	}
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
			r.inflight[i] = true
			r.setWantedLocked(i, false)
			r.upstream.inflight++
			return i, r.upstream, false
		}
	}
	var i int
	var pq *parentQueue
	var win []int
	if r.c.opts.Selector == SelectorFCFS {
		win = r.windowLocked(r.c.opts.Window)
		i, pq = r.pickFCFS(win, now)
	} else {
		i, pq = r.pickState(now)
	}
	stalled := now.Sub(r.progress) > r.c.opts.StallTimeout
	if pq == nil && r.upstream != nil && r.upstream.inflight < min(r.c.opts.UpstreamConcurrency, 1+r.upstream.picks) &&
		(r.allowUpstream || len(r.parents) == 0 || stalled) {
		if win == nil {
			win = r.windowLocked(1)
		}
		if stalled && !r.allowUpstream {
			r.c.log.Warn("no peer sent a piece in time; taking it from the upstream", "digest", r.job.Digest(), "piece", win[0], "stalled", now.Sub(r.progress).Round(time.Millisecond))
		}
		i, pq = win[0], r.upstream
	}
	if pq != nil {
		r.inflight[i] = true
		r.setWantedLocked(i, false)
		pq.inflight++
	}
	return i, pq, false
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

// setWantedLocked keeps wanted and every parent's offering count in step.
func (r *Run) setWantedLocked(i int, w bool) {
	if r.wanted[i] == w {
		return
	}
	r.wanted[i] = w
	d := 1
	if w {
		r.wantedPos[i] = len(r.wantedList)
		r.wantedList = append(r.wantedList, i)
	} else {
		d = -1
		k, last := r.wantedPos[i], r.wantedList[len(r.wantedList)-1]
		r.wantedList[k], r.wantedPos[last] = last, k
		r.wantedList = r.wantedList[:len(r.wantedList)-1]
		r.wantedPos[i] = -1
	}
	r.nwanted += d
	for _, pq := range r.order {
		if pq.has[i] {
			pq.offering += d
		}
	}
}

// available says whether a peer parent may be given another piece now.
func (r *Run) available(pq *parentQueue, now time.Time) bool {
	return pq.blocked.Before(now) && pq.inflight < r.c.opts.PerParent
}

// offers says whether pq may be asked for piece i now.
func (pq *parentQueue) offers(i int, now time.Time) bool {
	if !pq.has[i] {
		return false
	}
	return pq.refused == nil || pq.refused[i].Before(now)
}

func (pq *parentQueue) refuse(i int, until time.Time) {
	if pq.refused == nil {
		pq.refused = make([]time.Time, len(pq.has))
	}
	pq.refused[i] = until
}

func (r *Run) pickFCFS(win []int, now time.Time) (int, *parentQueue) {
	for _, i := range win {
		first, ok := r.parents[r.firstHolder[i]]
		if !ok {
			continue
		}
		if first.offers(i, now) {
			if r.available(first, now) {
				return i, first
			}
			continue
		}
		// The first holder sent it elsewhere: the next parent, in the order
		// they joined, that offers it.
		for _, o := range r.order {
			if r.available(o, now) && o.offers(i, now) {
				return i, o
			}
		}
	}
	return 0, nil
}

func (r *Run) pickState(now time.Time) (int, *parentQueue) {
	type cand struct {
		pq     *parentQueue
		weight float64
	}
	var cands []cand
	var total float64
	for _, pq := range r.order {
		if pq.offering > 0 && r.available(pq, now) {
			w := r.weightLocked(pq)
			cands = append(cands, cand{pq, w})
			total += w
		}
	}
	cursor := r.cursor()
	// A chosen parent may offer nothing after all (it refused every piece
	// it has for now): choose again without it.
	for len(cands) > 0 {
		x := r.c.float64() * total
		k := len(cands) - 1
		for j, c := range cands {
			if x < c.weight {
				k = j
				break
			}
			x -= c.weight
		}
		if i := r.bestPiece(cands[k].pq, cursor, now); i >= 0 {
			return i, cands[k].pq
		}
		total -= cands[k].weight
		cands = append(cands[:k], cands[k+1:]...)
	}
	return 0, nil
}

// bestPiece takes of the wanted pieces the parent offers one the readers
// need next (within Urgent of the cursor), else the one the fewest other
// nodes are fetching, then the rarest, then the nearest the readers. Rarest
// first over the whole blob, not a window: when every node wanted the same
// few pieces next, the few nodes holding them would serve the whole cluster.
func (r *Run) bestPiece(pq *parentQueue, cursor int, now time.Time) int {
	best, bestKey := -1, [4]int{}
	// Whichever is shorter: what the parent has, or what this node wants.
	candidates := r.wantedList
	if len(pq.list) < len(candidates) {
		candidates = pq.list
	}
	for _, i := range candidates {
		if !r.wanted[i] || !pq.offers(i, now) {
			continue
		}
		dist := (i - cursor + r.n) % r.n
		urgent := 1
		if dist < r.c.opts.Urgent {
			urgent = 0
		}
		key := [4]int{urgent, r.fetchers[i], r.holders[i], dist}
		if best < 0 || less(key, bestKey) {
			best, bestKey = i, key
		}
	}
	return best
}

func less(a, b [4]int) bool {
	for k := range a {
		if a[k] != b[k] {
			return a[k] < b[k]
		}
	}
	return false
}

// Weight is a parent's share of the next choice: its spare upload bandwidth
// (with a floor of 1/20 of the maximum, so a busy parent still gets a
// little), divided by one plus its uploads in flight per upload slot, halved
// when its disk reads above 80% of its network maximum. An unknown state
// counts as an idle 1 Gbit/s host's floor: usable, but below any parent known
// to have spare bandwidth.
func Weight(st *pb.HostState, ok bool) float64 {
	const assumedMax = 125e6 // bytes/s: 1 Gbit/s
	if !ok || st == nil {
		return assumedMax / 20
	}
	maxTx := float64(st.GetMaxTxBandwidth())
	if maxTx <= 0 {
		maxTx = assumedMax
	}
	spare := max(maxTx-float64(st.GetTxBandwidth()), maxTx/20)
	slots := float64(max(st.GetUploadLimit(), 1))
	w := spare / (1 + 4*float64(st.GetUploadsInFlight())/slots)
	if float64(st.GetDiskReadBandwidth()) > 0.8*maxTx {
		w /= 2
	}
	return w
}

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
// parent refuses it for a while, so the faster one gets it.
func (r *Run) stealLocked() {
	now := r.c.opts.Now()
	for i, fs := range r.fetches {
		elapsed := now.Sub(fs.start)
		if elapsed < stealAfter {
			continue
		}
		read := fs.read.Load()
		rate := float64(read) / elapsed.Seconds()
		if rate > 0 && time.Duration(float64(fs.size-read)/rate*float64(time.Second)) < stealRemaining {
			continue
		}
		for _, q := range r.order {
			if q == fs.pq || !r.available(q, now) || !q.offers(i, now) {
				continue
			}
			if r.weightLocked(q) >= stealFactor*max(rate, 1) {
				r.c.log.Debug("moving a slow piece to another parent", "digest", r.job.Digest(), "piece", i,
					"from", fs.pq.p.ID(), "to", q.p.ID(), "rate", int64(rate))
				fs.pq.refuse(i, now.Add(r.c.opts.ElsewhereFor))
				fs.cancel(errStolen)
				delete(r.fetches, i)
				return
			}
		}
	}
}

type countingReader struct {
	r io.Reader
	n *atomic.Int64
}

func (c countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	return n, err
}

func (r *Run) fetch(ctx context.Context, i int, pq *parentQueue) error {
	ctx, cancelCause := context.WithCancelCause(ctx)
	cancel := func() { cancelCause(nil) }
	timer := time.AfterFunc(r.c.opts.PieceTimeout, cancel)
	off, n := r.job.Plan().Range(i)
	var fs *fetchState
	if !pq.upstream {
		fs = &fetchState{pq: pq, start: r.c.opts.Now(), size: n, cancel: cancelCause}
		r.mu.Lock()
		r.fetches[i] = fs
		r.mu.Unlock()
		defer func() {
			r.mu.Lock()
			if r.fetches[i] == fs {
				delete(r.fetches, i)
			}
			r.mu.Unlock()
		}()
		defer r.watchFetch(ctx, i, fs)()
	}
	body, err := pq.p.Fetch(ctx, i, off, n)
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
		return stolen(ctx, err)
	}
	defer body.Close()
	// A peer's piece is checked against the owner's checksum where the
	// owner announced one (a checksum its sender could not choose), else
	// against the sender's own, which catches accidents. The digest, at the
	// end, catches the rest.
	r.mu.Lock()
	var crc uint32
	known := !pq.upstream && pq.has[i]
	if known {
		crc = pq.crc[i]
		if r.trustedSeen[i] {
			crc = r.trusted[i]
		}
	}
	r.mu.Unlock()
	var src io.Reader = io.LimitReader(body, n+1)
	if fs != nil {
		src = countingReader{r: src, n: &fs.read}
	}
	err = stolen(ctx, r.job.Put(i, src, pq.p.ID(), Expect{CRC: crc, Known: known}))
	if err == nil && fs != nil {
		if secs := r.c.opts.Now().Sub(fs.start).Seconds(); secs > 0 {
			rate := float64(n) / secs
			r.mu.Lock()
			if pq.measured == 0 {
				pq.measured = rate
			} else {
				pq.measured = (pq.measured + rate) / 2
			}
			r.mu.Unlock()
		}
	}
	return err
}

// stolen reports a fetch cancelled by stealLocked or watchRate as the
// reason it was cancelled for.
func stolen(ctx context.Context, err error) error {
	if err != nil {
		if cause := context.Cause(ctx); errors.Is(cause, errStolen) || errors.Is(cause, errTooSlow) || errors.Is(cause, errRaced) {
			return cause
		}
	}
	return err
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

// streamWhole fills every missing piece from a body that holds the whole
// blob; the other workers stop picking.
func (r *Run) streamWhole(whole *ErrWhole, pq *parentQueue, cancel context.CancelCauseFunc) error {
	body := whole.Body
	defer body.Close()
	r.mu.Lock()
	first := !r.sequential
	r.sequential = true
	r.mu.Unlock()
	if !first {
		return nil
	}
	plan := r.job.Plan()
	for i := 0; i < plan.Count(); i++ {
		_, n := plan.Range(i)
		if r.job.Has(i) {
			if _, err := io.CopyN(io.Discard, body, n); err != nil {
				return fmt.Errorf("collector: whole blob from %s: %w", pq.p.ID(), err)
			}
			continue
		}
		if err := r.job.Put(i, io.LimitReader(body, n), pq.p.ID(), Expect{}); err != nil {
			return fmt.Errorf("collector: whole blob from %s: %w", pq.p.ID(), err)
		}
		r.mu.Lock()
		pq.picks++
		pq.bytes += n
		r.mu.Unlock()
	}
	cancel(errAllDone)
	return nil
}
