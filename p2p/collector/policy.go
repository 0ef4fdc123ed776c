package collector

// The selection policies: which parent sends which piece next.

import (
	"math"
	"slices"
	"time"

	"github.com/registry-proxy/registry-proxy/p2p/pb"
)

// measuredFactor bounds a parent's weight by what this node measured from
// it: a parent's own report of spare bandwidth is believed up to this many
// times the rate its pieces actually came at.
const measuredFactor = 4

// weightLocked is pq's selection weight: its host state, capped by what
// this node measured from it.
func (r *Run) weightLocked(pq *parentQueue) float64 {
	st, ok := r.c.opts.State(pq.id)
	w := Weight(st, ok)
	if pq.measured > 0 {
		w = min(w, measuredFactor*pq.measured)
	}
	return w
}

// policy chooses the next piece and the peer parent to send it; a nil
// parent means no peer may send a wanted piece now. win is the readers'
// window it looked at, of which the upstream takes the first (nil: none).
type policy interface {
	pick(r *Run, now time.Time) (i int, pq *parentQueue, win []int)
	// announced books what the policy keeps of an announcement: fresh are
	// the pieces pq announced for the first time.
	announced(r *Run, pq *parentQueue, fresh []int)
}

// policyFor is the policy a Selector names (validated in New).
func policyFor(selector string) policy {
	if selector == SelectorFCFS {
		return fcfsPolicy{}
	}
	return statePolicy{}
}

// fcfsPolicy sends each piece of the readers' window, in order, from the
// first parent that announced it (the next in join order if that one sent
// it elsewhere).
type fcfsPolicy struct{}

// announced records the first parent to announce each piece; one
// announcement's pieces are first held in index order.
func (fcfsPolicy) announced(r *Run, pq *parentQueue, fresh []int) {
	if len(fresh) == 0 {
		return
	}
	if r.firstHolder == nil {
		r.firstHolder = make([]string, r.n)
	}
	slices.Sort(fresh)
	for _, i := range fresh {
		if r.firstHolder[i] == "" {
			r.firstHolder[i] = pq.id
		}
	}
}

func (fcfsPolicy) pick(r *Run, now time.Time) (int, *parentQueue, []int) {
	win := r.windowLocked(r.c.opts.Window)
	if r.firstHolder == nil {
		return 0, nil, win // no parent announced a piece
	}
	for _, i := range win {
		first, ok := r.parents[r.firstHolder[i]]
		if !ok {
			continue
		}
		if r.offers(first, i, now) {
			if r.available(first, now) {
				return i, first, win
			}
			continue
		}
		// The first holder sent it elsewhere: the next parent, in the order
		// they joined, that offers it.
		for _, o := range r.order {
			if r.available(o, now) && r.offers(o, i, now) {
				return i, o, win
			}
		}
	}
	return 0, nil, win
}

// candidate is a parent statePolicy may choose, with its weight.
type candidate struct {
	pq     *parentQueue
	weight float64
}

// statePolicy chooses a parent by weighted random choice on its host state
// (capped by the rate measured from it), then its best piece (bestPiece).
type statePolicy struct{}

// announced: the state policy weighs the parents holding a piece now, not
// the order they announced it in.
func (statePolicy) announced(*Run, *parentQueue, []int) {}

func (statePolicy) pick(r *Run, now time.Time) (int, *parentQueue, []int) {
	cands := r.cands[:0] // the run's, reused: a pick runs on every change
	defer func() { r.cands = cands[:0] }()
	var total float64
	for _, pq := range r.order {
		if pq.offering > 0 && !now.Before(pq.dry) && r.available(pq, now) {
			w := r.weightLocked(pq)
			cands = append(cands, candidate{pq, w})
			total += w
		}
	}
	// While a peer sends this node anything, a parent on a link far slower
	// than the fastest parent's sends only pieces no other parent has: a
	// piece it takes seconds over would otherwise be the one the whole
	// download waits for at its end, where a fast parent frees up in a
	// piece's time (scenario e: the throttled nodes' pieces were the last
	// ones their children got, docs/benchmarks/notebook.md).
	slowBelow := int64(0)
	if r.peerFetchingLocked() {
		slowBelow = r.fastestLocked(now) / slowLink
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
		slow := false
		if slowBelow > 0 {
			tx := r.maxTxLocked(cands[k].pq)
			slow = tx > 0 && tx < slowBelow
		}
		if i := r.bestPiece(cands[k].pq, cursor, now, slow); i >= 0 {
			return i, cands[k].pq, nil
		}
		total -= cands[k].weight
		cands = append(cands[:k], cands[k+1:]...)
	}
	return 0, nil, nil
}

// bestPiece takes of the wanted pieces the parent offers one the readers
// need next (within Urgent of the cursor), else the one the fewest other
// nodes are fetching, then the rarest, then the nearest the readers. Rarest
// first over the whole blob, not a window: when every node wanted the same
// few pieces next, the few nodes holding them would serve the whole cluster.
// A parent found to offer nothing (every wanted piece it has refused) is
// dry until the first refusal ends. uniqueOnly looks only at pieces no other
// parent holds.
func (r *Run) bestPiece(pq *parentQueue, cursor int, now time.Time, uniqueOnly bool) int {
	ms := r.sinceEpoch(now)
	// wake: the first refusal to end among the wanted pieces it has.
	best, bestKey, wake := -1, [4]int{}, uint32(math.MaxUint32)
	// Whichever is shorter: what the parent has, or what this node wants.
	candidates := r.wantedList
	if len(pq.list) < len(candidates) {
		candidates = pq.list
	}
	for _, i32 := range candidates {
		i := int(i32)
		if !r.wanted[i] || !pq.has[i] || uniqueOnly && r.holders[i] > 1 {
			continue
		}
		if pq.refusedAt(i, ms) {
			wake = min(wake, pq.refused[i])
			continue
		}
		dist := i - cursor
		if dist < 0 {
			dist += r.n
		}
		urgent := 1
		if dist < r.c.opts.Urgent {
			urgent = 0
		}
		key := [4]int{urgent, r.fetchers[i], r.holders[i], dist}
		if best < 0 || less(key, bestKey) {
			best, bestKey = i, key
		}
	}
	if best < 0 && wake != math.MaxUint32 && !uniqueOnly {
		pq.dry = r.epochTime(wake)
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

// slowLink: a parent whose link's maximum is under the fastest parent's
// divided by this is slow (statePolicy.pick).
const slowLink = 4

// fastestLocked is the highest upload maximum a parent reports, looked at
// again at most every fastestEvery (a pick runs on every change; host
// states move every few seconds).
func (r *Run) fastestLocked(now time.Time) int64 {
	if r.fastestAt.IsZero() || now.Sub(r.fastestAt) >= fastestEvery {
		r.fastest, r.fastestAt = 0, now
		for _, pq := range r.order {
			r.fastest = max(r.fastest, r.maxTxLocked(pq))
		}
	}
	return r.fastest
}

const fastestEvery = 250 * time.Millisecond

// maxTxLocked is the upload maximum pq reports; 0 when unknown.
func (r *Run) maxTxLocked(pq *parentQueue) int64 {
	st, ok := r.c.opts.State(pq.id)
	if !ok || st == nil {
		return 0
	}
	return int64(st.GetMaxTxBandwidth())
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
