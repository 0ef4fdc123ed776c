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
// 70 or more; docs/benchmarks.md).
package tracker

import (
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
}

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

func (ps *peerSet) put(p Peer) {
	if i, ok := ps.pos[p.ID]; ok {
		ps.list[i] = p
		return
	}
	ps.pos[p.ID] = len(ps.list)
	ps.list = append(ps.list, p)
	ps.named = append(ps.named, 0)
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
	return &Tracker{rng: rng, peers: map[string]*peerSet{}, held: map[string]holding{}, holders: map[string]*peerSet{}}
}

// Hold replaces the keys node p announced it holds complete: Peers hands
// it out for them, and Holders counts it.
func (t *Tracker) Hold(p Peer, keys []string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, k := range t.held[p.ID].keys {
		removeFrom(t.holders, k, p.ID)
	}
	if len(keys) == 0 {
		delete(t.held, p.ID)
		return
	}
	t.held[p.ID] = holding{peer: p, keys: keys}
	for _, k := range keys {
		set(t.holders, k).put(p)
	}
}

// Retain forgets the registrations and holdings of every node live does
// not name (nodes that left the cluster), and the keys left with nobody.
func (t *Tracker) Retain(live map[string]bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for key, ps := range t.peers {
		for _, id := range ps.ids() {
			if !live[id] {
				removeFrom(t.peers, key, id)
			}
		}
	}
	for id, h := range t.held {
		if live[id] {
			continue
		}
		for _, k := range h.keys {
			removeFrom(t.holders, k, id)
		}
		delete(t.held, id)
	}
}

// Held is the number of (node, key) holdings announced.
func (t *Tracker) Held() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := 0
	for _, h := range t.held {
		n += len(h.keys)
	}
	return n
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
// (docs/benchmarks.md). Limit 0 only records.
func (t *Tracker) Register(key string, p Peer, limit int) []Peer {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := t.peersLocked(key, p.ID, limit)
	set(t.peers, key).put(p)
	return out
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
