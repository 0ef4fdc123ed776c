package collector

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"time"

	"github.com/registry-proxy/registry-proxy/piece"
)

// Run is the collection of one blob. Parents and their announcements may be
// added while it runs.
type Run struct {
	c   *Collector
	job Job
	n   int

	mu            sync.Mutex
	wake          chan struct{} // the idle workers' wake-up token (dispatch.go)
	changed       bool          // the token was left by a change
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
	firstHolder []string // per piece: first parent that announced it (FCFS's; nil until then)
	holders     []int    // per piece: parents that have it
	fetchers    []int    // per piece: parents fetching it
	wanted      []bool   // per piece: not done and not in flight
	nwanted     int
	wantedList  []int32             // the wanted pieces, in no order
	wantedPos   []int32             // per piece: its index in wantedList, or -1
	inflight    []int               // pieces being fetched, a few: one per fetch
	fetches     map[int]*fetchState // peer fetches in flight
	moved       []bool              // per piece: moved once to a faster parent (stealLocked)
	cands       []candidate         // statePolicy's, reused
	failures    []int
	epoch       time.Time // refusals count from here
	progress    time.Time // last piece done by a peer
	// pieceTime is a moving average of how long a peer piece took, start
	// to end (elsewhereFor).
	pieceTime time.Duration
	// fastest is the highest upload maximum a parent reported, as of
	// fastestAt (fastestLocked).
	fastest   int64
	fastestAt time.Time
	// granted: pieces this node reads from the upstream as the owner's
	// delegate, before any peer piece; denied: pieces the owner left to
	// its delegates, from the upstream only when stalled. Nil until set.
	granted, denied []bool
}

// NewRun starts the bookkeeping of a blob; Run fetches.
func (c *Collector) NewRun(job Job) *Run {
	n := job.Plan().Count()
	r := &Run{
		c: c, job: job, n: n,
		progress:    c.opts.Now(),
		epoch:       c.opts.Now(),
		wake:        make(chan struct{}, 1),
		parents:     map[string]*parentQueue{},
		holders:     make([]int, n),
		fetchers:    make([]int, n),
		wanted:      make([]bool, n),
		wantedPos:   make([]int32, n),
		fetches:     map[int]*fetchState{},
		moved:       make([]bool, n),
		failures:    make([]int, n),
		trusted:     make([]uint32, n),
		trustedSeen: make([]bool, n),
	}
	for i := range n {
		r.wantedPos[i] = -1
		if !job.Has(i) {
			r.setWantedLocked(i, true) // no parents yet: nothing else to keep in step
		}
	}
	return r
}

// broadcastLocked tells the idle workers something changed.
func (r *Run) broadcastLocked() {
	r.changed = true
	r.wakeOne()
}

// SetUpstream sets the parent of last resort, and whether it may be used now.
func (r *Run) SetUpstream(p Parent, allowed bool) {
	r.closeUpstream(p)
	r.mu.Lock()
	defer r.mu.Unlock()
	r.upstream = &parentQueue{p: p, id: p.ID(), upstream: true}
	r.allowUpstream = allowed
	r.broadcastLocked()
}

// closeUpstream closes the upstream parent (its stream of the whole blob,
// when the registry ignores Range) unless it is next.
func (r *Run) closeUpstream(next Parent) {
	r.mu.Lock()
	up := r.upstream
	r.mu.Unlock()
	if up == nil || up.p == next {
		return
	}
	if c, ok := up.p.(io.Closer); ok {
		c.Close()
	}
}

// AllowUpstream lets pieces no peer has come from the upstream (or stops it).
// GrantUpstream has this node read pieces from the upstream itself (the
// owner delegated them), as soon as the upstream has room.
func (r *Run) GrantUpstream(pieces []int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.granted = mark(r.granted, r.n, pieces)
	r.broadcastLocked()
}

// DenyUpstream leaves pieces to the delegates that read them from the
// upstream: this node takes them from those peers, and from the upstream
// only when no peer sends anything for StallTimeout.
func (r *Run) DenyUpstream(pieces []int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.denied = mark(r.denied, r.n, pieces)
	r.broadcastLocked()
}

func mark(set []bool, n int, pieces []int) []bool {
	if set == nil {
		set = make([]bool, n)
	}
	for _, i := range pieces {
		if i >= 0 && i < n {
			set[i] = true
		}
	}
	return set
}

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

// Peer is a parent added to a run (AddParent's answer): its announcements
// and its removal go to its books directly, where a lookup by name for
// each cost more than the announcement itself at thousands of simulated
// nodes (one per piece, parent and child).
type Peer struct {
	r  *Run
	pq *parentQueue
}

// AddParent adds a peer parent with no pieces yet; a parent already there
// stays as it is.
func (r *Run) AddParent(p Parent) Peer {
	r.mu.Lock()
	defer r.mu.Unlock()
	id := p.ID()
	if pq, ok := r.parents[id]; ok {
		return Peer{r, pq}
	}
	pq := &parentQueue{p: p, id: id, has: make([]bool, r.n), fetching: make([]bool, r.n)}
	r.parents[id] = pq
	r.order = append(r.order, pq)
	return Peer{r, pq}
}

// Remove forgets the parent (it left, or its stream ended); nothing when it
// is gone already.
func (pe Peer) Remove() {
	pe.r.mu.Lock()
	defer pe.r.mu.Unlock()
	if !pe.pq.removed {
		pe.r.removeLocked(pe.pq)
	}
}

func (r *Run) removeLocked(pq *parentQueue) {
	for i := range r.n {
		if pq.has[i] {
			r.holders[i]--
		}
		if pq.fetching[i] {
			r.fetchers[i]--
		}
	}
	pq.removed = true
	delete(r.parents, pq.id)
	if k := slices.Index(r.order, pq); k >= 0 {
		r.order = append(r.order[:k:k], r.order[k+1:]...)
	}
	r.broadcastLocked()
}

// Held is a piece a parent holds, with its checksum.
type Held struct {
	Index int
	CRC   uint32
}

// Announce records pieces a parent has (with checksums) and the pieces it is
// fetching now (replacing its previous list when fetching is not nil).
func (r *Run) Announce(id string, has []Held, fetching []int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if pq, ok := r.parents[id]; ok {
		r.announceLocked(pq, has, fetching)
	}
}

// Announce is Run.Announce for this parent; nothing once it is removed.
func (pe Peer) Announce(has []Held, fetching []int) {
	pe.r.mu.Lock()
	defer pe.r.mu.Unlock()
	if !pe.pq.removed {
		pe.r.announceLocked(pe.pq, has, fetching)
	}
}

// AnnounceComplete is Run.AnnounceComplete for this parent.
func (pe Peer) AnnounceComplete(crcs []Held) { pe.Announce(crcs, []int{}) }

func (r *Run) announceLocked(pq *parentQueue, has []Held, fetching []int) {
	id := pq.id
	var fresh []int
	for _, h := range has {
		i, crc := h.Index, h.CRC
		if i < 0 || i >= r.n {
			continue
		}
		if !pq.has[i] {
			fresh = append(fresh, i)
			pq.has[i] = true
			pq.list = append(pq.list, int32(i))
			r.holders[i]++
			if r.wanted[i] {
				pq.offering++
				pq.dry = time.Time{}
			}
		}
		pq.setChecksum(i, crc)
		if id == r.authority {
			r.trusted[i], r.trustedSeen[i] = crc, true
		}
		if pq.fetching[i] {
			pq.fetching[i] = false
			r.fetchers[i]--
		}
	}
	r.c.policy.announced(r, pq, fresh)
	wanted := false
	for _, i := range fresh {
		wanted = wanted || !r.job.Has(i)
	}
	if fetching != nil {
		// Both lists are short (a parent fetches a few pieces at once):
		// unmark the old, mark the new, no pass over the whole blob.
		for _, i := range pq.fetchList {
			if pq.fetching[i] {
				pq.fetching[i] = false
				r.fetchers[i]--
			}
		}
		pq.fetchList = pq.fetchList[:0]
		for _, i := range fetching {
			if i >= 0 && i < r.n && !pq.has[i] && !pq.fetching[i] {
				pq.fetching[i] = true
				r.fetchers[i]++
				pq.fetchList = append(pq.fetchList, i)
			}
		}
	}
	// Workers only care about pieces this node still needs; waking them
	// for the rest costs a cluster's worth of announcements.
	if wanted {
		r.broadcastLocked()
	}
}

// AnnounceComplete records that a parent holds the whole, verified blob,
// with the checksum of every piece: it offers every piece.
func (r *Run) AnnounceComplete(id string, crcs []Held) {
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
				r.trusted[i], r.trustedSeen[i] = pq.checksum(i), true
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
	if len(r.inflight) == 0 {
		return nil
	}
	out := slices.Clone(r.inflight)
	slices.Sort(out)
	return slices.Compact(out)
}

// finish books the outcome of one fetch.
func (r *Run) finish(ctx context.Context, i int, pq *parentQueue, took time.Duration, err error) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if k := slices.Index(r.inflight, i); k >= 0 {
		r.inflight = slices.Delete(r.inflight, k, k+1)
	}
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
		r.refuse(pq, i, r.c.opts.Now().Add(r.c.opts.ElsewhereFor))
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
		now := r.c.opts.Now()
		elsewhere := r.elsewhereForLocked()
		r.refuse(pq, i, now.Add(elsewhere))
		// The parent said what it would send instead: the rest of what it
		// has would be refused too, a round trip each. Not asked for them
		// for a quarter of that only: a busy parent's answer goes stale
		// fast (in the simulator the whole time left children idle: p50
		// 1.29 → 1.36 × the bound, 150 nodes; a quarter 1.31).
		// A set that does not fit the blob is ignored: the refusal stands,
		// its hint does not.
		if ee := (*ElsewhereError)(nil); errors.As(err, &ee) && ee.Offered != "" {
			if offered, err := piece.DecodeSet(ee.Offered, r.n); err == nil {
				soon := r.untilEpoch(now.Add(elsewhere / 4))
				for _, j := range pq.list {
					if !offered[j] {
						pq.refuseUntil(int(j), soon)
					}
				}
			}
		}
		return nil
	}
	if err == nil {
		if !pq.upstream {
			r.progress = r.c.opts.Now()
			if r.pieceTime == 0 {
				r.pieceTime = took
			} else {
				r.pieceTime += (took - r.pieceTime) / 8
			}
		}
		pq.picks++
		_, n := r.job.Plan().Range(i)
		pq.bytes += n
		if pq.upstream {
			pq.probe.landed(r.c.opts.Now(), n, r.c.opts.UpstreamConcurrency)
		}
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
	if r.granted != nil && r.granted[i] && !r.allowUpstream {
		// This node cannot read the pieces delegated to it (its client's
		// credentials, say): it gives them back and takes them from peers;
		// the owner reads them once it sees nobody send them.
		r.granted = nil
		r.c.log.Warn("cannot read delegated pieces from the upstream; leaving them to the owner", "digest", r.job.Digest(), "piece", i, "err", err)
		return nil
	}
	r.failures[i]++
	if r.failures[i] >= r.c.opts.Attempts {
		return fmt.Errorf("%w: piece %d of %s from %s: %w", ErrExhausted, i, r.job.Digest(), pq.p.ID(), err)
	}
	r.c.log.Warn("piece failed, retrying", "digest", r.job.Digest(), "piece", i, "parent", pq.p.ID(), "attempt", r.failures[i], "err", err)
	return nil
}

// elsewhereForLocked is how long a parent that sent a piece elsewhere is not
// asked for it again: about the time the child that got it takes to pass it
// on, twice a peer piece's typical time here, at most ElsewhereFor (and at
// least a twentieth of it). A fixed time meant six piece times on a 25 MB/s
// link and seventy on 300 MB/s ones, where children sat out refusals while
// parents holding what they lacked idled (docs/benchmarks/notebook.md).
func (r *Run) elsewhereForLocked() time.Duration {
	most := r.c.opts.ElsewhereFor
	if r.pieceTime == 0 {
		return most
	}
	return min(max(2*r.pieceTime, most/20), most)
}
