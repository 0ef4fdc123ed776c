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
}

// New returns an empty tracker drawing samples from rng (a random source
// when nil).
func New(rng *rand.Rand) *Tracker {
	if rng == nil {
		rng = rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64()))
	}
	return &Tracker{rng: rng, peers: map[string]map[string]Peer{}}
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

// Peers returns up to max of key's registered nodes, except one, chosen at
// random.
func (t *Tracker) Peers(key, except string, max int) []Peer {
	t.mu.Lock()
	defer t.mu.Unlock()
	all := make([]Peer, 0, len(t.peers[key]))
	for id, p := range t.peers[key] {
		if id != except {
			all = append(all, p)
		}
	}
	// Map order is random but not uniformly so; sort, then shuffle with
	// the tracker's own source (tests fix it).
	sort.Slice(all, func(i, j int) bool { return all[i].ID < all[j].ID })
	t.rng.Shuffle(len(all), func(i, j int) { all[i], all[j] = all[j], all[i] })
	return all[:min(len(all), max)]
}
