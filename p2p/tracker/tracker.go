// Package tracker keeps, for each digest a node owns, the nodes that
// registered to fetch it, and hands each newcomer a sample of them.
// A random sample, not the newest: when a whole cluster registers within a
// second, "the newest 32" is the same 32 nodes for everyone, and those few
// would upload to the whole cluster while the rest of it idles. Random
// samples make the peer graph an expander, where every node's upload counts.
// Of a random draw of twice the sample, the nodes handed out least go: a
// plain random sample names the first registrants to nearly every later
// node and the last ones to almost none, whose upload then idles (in 1,000
// simulated nodes a tenth were followed by 3 nodes or fewer, and a tenth by
// 70 or more; docs/benchmarks/notebook.md).
package tracker

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"time"
)

// Peer is a registered node.
type Peer struct {
	ID, Addr string
	Seen     time.Time
}

// Tracker is safe for concurrent use.
type Tracker struct {
	mu    sync.Mutex
	rng   *rand.Rand
	peers map[string]*peerSet // key -> registered nodes
	// held: what each node announced it holds complete (Hold); holders
	// indexes it by key.
	held    map[string]holding
	holders map[string]*peerSet // key -> holding nodes

	// limits bound what the nodes can make this one remember (SetLimits);
	// regs counts each node's registrations, nreg and nheld all of them.
	limits    Limits
	regs      map[string]int
	nreg      int
	nheld     int
	lastSweep time.Time
}

// Limits bound a tracker: any member can register for digests and
// announce blobs, so without them one member fills the node's memory.
// Zero fields: no limit.
type Limits struct {
	// PerPeer and Total cap registrations (key, node): one node's, and
	// all of them.
	PerPeer, Total int
	// HeldPerPeer and HeldTotal cap announced holdings likewise.
	HeldPerPeer, HeldTotal int
	// RegisterTTL and HoldTTL: a registration or holding not refreshed
	// for this long is forgotten.
	RegisterTTL, HoldTTL time.Duration
	// Now is the clock the TTLs are measured on; nil: time.Now.
	Now func() time.Time
}

// ErrFull is a registration or announcement refused as over a Limits cap:
// nothing of it is recorded.
var ErrFull = errors.New("tracker: full")

// sweepEvery is how often, at most, writes look for expired entries (a
// walk over every entry).
const sweepEvery = time.Minute

type holding struct {
	peer Peer
	keys []string
}

// peerSet is a set of peers in a slice, so that a sample draws indices
// instead of copying, sorting and shuffling the whole set: a blob a whole
// cluster pulls has every node registered at its owner, and each of them
// registers again at every refresh.
type peerSet struct {
	list  []Peer
	named []int          // how often each was handed out
	pos   map[string]int // id -> index in list
}

// put adds or refreshes p; it reports whether p is new to the set.
func (ps *peerSet) put(p Peer) bool {
	if i, ok := ps.pos[p.ID]; ok {
		ps.list[i] = p
		return false
	}
	ps.pos[p.ID] = len(ps.list)
	ps.list = append(ps.list, p)
	ps.named = append(ps.named, 0)
	return true
}

func (ps *peerSet) has(id string) bool { _, ok := ps.pos[id]; return ok }

// remove swaps the last peer into id's place.
func (ps *peerSet) remove(id string) {
	i, ok := ps.pos[id]
	if !ok {
		return
	}
	last := len(ps.list) - 1
	ps.list[i], ps.named[i] = ps.list[last], ps.named[last]
	ps.pos[ps.list[i].ID] = i
	ps.list[last] = Peer{}
	ps.list, ps.named = ps.list[:last], ps.named[:last]
	delete(ps.pos, id)
}

func (ps *peerSet) len() int {
	if ps == nil {
		return 0
	}
	return len(ps.list)
}

func (ps *peerSet) ids() []string {
	ids := make([]string, len(ps.list))
	for i, p := range ps.list {
		ids[i] = p.ID
	}
	return ids
}

// set returns m's set for key, made when missing.
func set(m map[string]*peerSet, key string) *peerSet {
	ps := m[key]
	if ps == nil {
		ps = &peerSet{pos: map[string]int{}}
		m[key] = ps
	}
	return ps
}

// removeFrom takes id out of key's set in m, and the set when empty.
func removeFrom(m map[string]*peerSet, key, id string) {
	if ps := m[key]; ps != nil {
		ps.remove(id)
		if ps.len() == 0 {
			delete(m, key)
		}
	}
}

// New returns an empty tracker drawing samples from rng (a random source
// when nil).
func New(rng *rand.Rand) *Tracker {
	if rng == nil {
		rng = rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64()))
	}
	return &Tracker{rng: rng, peers: map[string]*peerSet{}, held: map[string]holding{}, holders: map[string]*peerSet{}, regs: map[string]int{}}
}

// SetLimits bounds the tracker from now on (entries already over a cap
// stay until they expire or their node leaves).
func (t *Tracker) SetLimits(l Limits) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.limits = l
}

func (t *Tracker) nowLocked() time.Time {
	if t.limits.Now != nil {
		return t.limits.Now()
	}
	return time.Now()
}

// Hold replaces the keys node p announced it holds complete: Peers hands
// it out for them, and Holders counts it. Over a cap (Limits) it changes
// nothing.
func (t *Tracker) Hold(p Peer, keys []string) { _ = t.TryHold(p, keys) }

// TryHold is Hold, refusing with ErrFull (and recording nothing) keys over
// the HeldPerPeer or HeldTotal cap. p.Seen dates the holding (HoldTTL).
func (t *Tracker) TryHold(p Peer, keys []string) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.maybeSweepLocked()
	old := len(t.held[p.ID].keys)
	if l := t.limits; len(keys) > old {
		if l.HeldPerPeer > 0 && len(keys) > l.HeldPerPeer {
			return fmt.Errorf("%w: %d blobs announced by %s, at most %d", ErrFull, len(keys), p.ID, l.HeldPerPeer)
		}
		if l.HeldTotal > 0 && t.nheld-old+len(keys) > l.HeldTotal {
			t.sweepFullLocked()
			if t.nheld-old+len(keys) > l.HeldTotal {
				return fmt.Errorf("%w: %d blobs announced in all, at most %d", ErrFull, t.nheld-old+len(keys), l.HeldTotal)
			}
		}
	}
	t.dropHoldingLocked(p.ID)
	if len(keys) == 0 {
		return nil
	}
	t.held[p.ID] = holding{peer: p, keys: keys}
	t.nheld += len(keys)
	for _, k := range keys {
		set(t.holders, k).put(p)
	}
	return nil
}

// dropHoldingLocked forgets what id announced.
func (t *Tracker) dropHoldingLocked(id string) {
	h, ok := t.held[id]
	if !ok {
		return
	}
	for _, k := range h.keys {
		removeFrom(t.holders, k, id)
	}
	t.nheld -= len(h.keys)
	delete(t.held, id)
}

// unregisterLocked forgets id's registration for key.
func (t *Tracker) unregisterLocked(key, id string) {
	ps := t.peers[key]
	if ps == nil || !ps.has(id) {
		return
	}
	removeFrom(t.peers, key, id)
	t.nreg--
	if t.regs[id]--; t.regs[id] <= 0 {
		delete(t.regs, id)
	}
}

// maybeSweepLocked sweeps when TTLs are set and the last sweep is
// sweepEvery old.
func (t *Tracker) maybeSweepLocked() {
	if t.limits.RegisterTTL <= 0 && t.limits.HoldTTL <= 0 {
		return
	}
	if now := t.nowLocked(); now.Sub(t.lastSweep) >= sweepEvery || now.Before(t.lastSweep) {
		t.sweepLocked(now)
	}
}

// sweepFullLocked sweeps, at a cap, unless the last sweep is under
// sweepFull old: a flood at a cap is not a sweep per call.
func (t *Tracker) sweepFullLocked() {
	if t.limits.RegisterTTL <= 0 && t.limits.HoldTTL <= 0 {
		return
	}
	if now := t.nowLocked(); now.Sub(t.lastSweep) >= sweepFull || now.Before(t.lastSweep) {
		t.sweepLocked(now)
	}
}

// sweepFull: see sweepFullLocked.
const sweepFull = time.Second

// sweepLocked forgets registrations and holdings past their TTL.
func (t *Tracker) sweepLocked(now time.Time) {
	t.lastSweep = now
	if ttl := t.limits.RegisterTTL; ttl > 0 {
		for key, ps := range t.peers {
			var stale []string
			for _, p := range ps.list {
				if now.Sub(p.Seen) > ttl {
					stale = append(stale, p.ID)
				}
			}
			for _, id := range stale {
				t.unregisterLocked(key, id)
			}
		}
	}
	if ttl := t.limits.HoldTTL; ttl > 0 {
		for id, h := range t.held {
			if now.Sub(h.peer.Seen) > ttl {
				t.dropHoldingLocked(id)
			}
		}
	}
}

// Expire forgets, now, the registrations and holdings past their TTL.
func (t *Tracker) Expire() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.sweepLocked(t.nowLocked())
}

// Registered is the number of registrations (key, node) recorded.
func (t *Tracker) Registered() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.nreg
}

// Retain forgets the registrations and holdings of every node live does
// not name (nodes that left the cluster), and the keys left with nobody.
// Entries past their TTL (Limits) go too.
func (t *Tracker) Retain(live map[string]bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for key, ps := range t.peers {
		for _, id := range ps.ids() {
			if !live[id] {
				t.unregisterLocked(key, id)
			}
		}
	}
	for id := range t.held {
		if !live[id] {
			t.dropHoldingLocked(id)
		}
	}
	if t.limits.RegisterTTL > 0 || t.limits.HoldTTL > 0 {
		t.sweepLocked(t.nowLocked())
	}
}

// Held is the number of (node, key) holdings announced.
func (t *Tracker) Held() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.nheld
}

// Holders returns the nodes that announced holding key complete.
func (t *Tracker) Holders(key string) []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	ps := t.holders[key]
	if ps == nil {
		return []string{}
	}
	ids := ps.ids()
	slices.Sort(ids)
	return ids
}

// Register hands p up to limit of key's nodes, as Peers does (p aside), and
// records (or refreshes) p's registration, under one hold of the lock:
// registrations that arrive together each see every one before them. Under
// two holds, a burst of them queued at the contended lock, which then hands
// it over in arrival order: every sample of the burst was drawn before any
// of it was recorded, the whole burst was named only the nodes registered
// before it, and nobody the nodes in it, whose upload then idled
// (docs/benchmarks/notebook.md). Limit 0 only records. Over a cap (Limits) it
// records nothing and returns nil.
func (t *Tracker) Register(key string, p Peer, limit int) []Peer {
	out, _ := t.TryRegister(key, p, limit, nil)
	return out
}

// TryRegister is Register, refusing with ErrFull a new registration over
// the PerPeer or Total cap. admit, when not nil, is asked about each new
// registration (not a refresh) that fits the caps, under the tracker's
// lock; its error refuses it. Refused, nothing is recorded. p.Seen dates
// the registration (RegisterTTL).
func (t *Tracker) TryRegister(key string, p Peer, limit int, admit func() error) ([]Peer, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.maybeSweepLocked()
	if ps := t.peers[key]; ps == nil || !ps.has(p.ID) {
		l := t.limits
		if l.PerPeer > 0 && t.regs[p.ID] >= l.PerPeer || l.Total > 0 && t.nreg >= l.Total {
			t.sweepFullLocked()
		}
		if l.PerPeer > 0 && t.regs[p.ID] >= l.PerPeer {
			return nil, fmt.Errorf("%w: %s holds %d registrations, at most %d", ErrFull, p.ID, t.regs[p.ID], l.PerPeer)
		}
		if l.Total > 0 && t.nreg >= l.Total {
			return nil, fmt.Errorf("%w: %d registrations, at most %d", ErrFull, t.nreg, l.Total)
		}
		if admit != nil {
			if err := admit(); err != nil {
				return nil, err
			}
		}
		t.regs[p.ID]++
		t.nreg++
	}
	out := t.peersLocked(key, p.ID, limit)
	set(t.peers, key).put(p)
	return out, nil
}

// Peers returns up to limit of key's registered and holding nodes, except
// one: the least handed out of twice limit drawn at random (indices drawn
// without replacement over the registered then the holding nodes, a partial
// Fisher–Yates shuffle that keeps only the positions it moved, so a sample
// costs about 2×limit draws, not the whole set).
func (t *Tracker) Peers(key, except string, limit int) []Peer {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.peersLocked(key, except, limit)
}

func (t *Tracker) peersLocked(key, except string, limit int) []Peer {
	reg, hold := t.peers[key], t.holders[key]
	nreg := reg.len()
	total := nreg + hold.len()
	out := make([]Peer, 0, min(max(limit, 0), total))
	moved := map[int]int{}
	at := func(k int) int {
		if v, ok := moved[k]; ok {
			return v
		}
		return k
	}
	type cand struct {
		ps *peerSet
		i  int
	}
	var cands []cand
	for k := 0; k < total && len(cands) < 2*limit; k++ {
		j := k + t.rng.IntN(total-k)
		pick := at(j)
		moved[j] = at(k)
		c := cand{reg, pick}
		if pick >= nreg {
			c = cand{hold, pick - nreg}
			if reg != nil && reg.has(hold.list[c.i].ID) {
				continue // registered too: drawn by its registration's index
			}
		}
		if c.ps.list[c.i].ID != except {
			cands = append(cands, c)
		}
	}
	slices.SortStableFunc(cands, func(a, b cand) int { return a.ps.named[a.i] - b.ps.named[b.i] })
	for _, c := range cands[:min(max(limit, 0), len(cands))] {
		c.ps.named[c.i]++
		out = append(out, c.ps.list[c.i])
	}
	return out
}
