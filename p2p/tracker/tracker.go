// Package tracker keeps, for each digest a node owns, the nodes that
// registered to fetch it, and hands each newcomer a random sample of them.
// A random sample, not the newest: when a whole cluster registers within a
// second, "the newest 32" is the same 32 nodes for everyone, and those few
// would upload to the whole cluster while the rest of it idles. Random
// samples make the peer graph an expander, where every node's upload counts.
package tracker

import (
	"math/rand/v2"
	"sort"
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
	peers map[string]map[string]Peer // key -> id -> peer
	// held: what each node announced it holds complete (Hold); holders
	// indexes it by key.
	held    map[string]holding
	holders map[string]map[string]bool // key -> ids
}

type holding struct {
	peer Peer
	keys []string
}

// New returns an empty tracker drawing samples from rng (a random source
// when nil).
func New(rng *rand.Rand) *Tracker {
	if rng == nil {
		rng = rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64()))
	}
	return &Tracker{rng: rng, peers: map[string]map[string]Peer{}, held: map[string]holding{}, holders: map[string]map[string]bool{}}
}

// Hold replaces the keys node p announced it holds complete: Peers hands
// it out for them, and Holders counts it.
func (t *Tracker) Hold(p Peer, keys []string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, k := range t.held[p.ID].keys {
		delete(t.holders[k], p.ID)
		if len(t.holders[k]) == 0 {
			delete(t.holders, k)
		}
	}
	if len(keys) == 0 {
		delete(t.held, p.ID)
		return
	}
	t.held[p.ID] = holding{peer: p, keys: keys}
	for _, k := range keys {
		if t.holders[k] == nil {
			t.holders[k] = map[string]bool{}
		}
		t.holders[k][p.ID] = true
	}
}

// Retain forgets the registrations and holdings of every node live does
// not name (nodes that left the cluster), and the keys left with nobody.
func (t *Tracker) Retain(live map[string]bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for key, ps := range t.peers {
		for id := range ps {
			if !live[id] {
				delete(ps, id)
			}
		}
		if len(ps) == 0 {
			delete(t.peers, key)
		}
	}
	for id, h := range t.held {
		if live[id] {
			continue
		}
		for _, k := range h.keys {
			delete(t.holders[k], id)
			if len(t.holders[k]) == 0 {
				delete(t.holders, k)
			}
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
	ids := make([]string, 0, len(t.holders[key]))
	for id := range t.holders[key] {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids
}

// Add records (or refreshes) a registration for key.
func (t *Tracker) Add(key string, p Peer) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.peers[key] == nil {
		t.peers[key] = map[string]Peer{}
	}
	t.peers[key][p.ID] = p
}

// Peers returns up to max of key's registered and holding nodes, except
// one, chosen at random.
func (t *Tracker) Peers(key, except string, max int) []Peer {
	t.mu.Lock()
	defer t.mu.Unlock()
	all := make([]Peer, 0, len(t.peers[key])+len(t.holders[key]))
	for id, p := range t.peers[key] {
		if id != except {
			all = append(all, p)
		}
	}
	for id := range t.holders[key] {
		if _, registered := t.peers[key][id]; !registered && id != except {
			all = append(all, t.held[id].peer)
		}
	}
	// Map order is random but not uniformly so; sort, then shuffle with
	// the tracker's own source (tests fix it).
	sort.Slice(all, func(i, j int) bool { return all[i].ID < all[j].ID })
	t.rng.Shuffle(len(all), func(i, j int) { all[i], all[j] = all[j], all[i] })
	return all[:min(len(all), max)]
}
