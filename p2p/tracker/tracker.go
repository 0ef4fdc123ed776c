// Package tracker keeps, for each digest a node owns, the nodes that
// registered to fetch it, and hands each newcomer the most recent of them:
// the ones most likely to be downloading still, with pieces to trade.
package tracker

import (
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
	peers map[string]map[string]Peer // key -> id -> peer
}

// New returns an empty tracker.
func New() *Tracker { return &Tracker{peers: map[string]map[string]Peer{}} }

// Add records (or refreshes) a registration for key.
func (t *Tracker) Add(key string, p Peer) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.peers[key] == nil {
		t.peers[key] = map[string]Peer{}
	}
	t.peers[key][p.ID] = p
}

// Peers lists up to max of key's registered nodes, newest first, without except.
func (t *Tracker) Peers(key, except string, max int) []Peer {
	t.mu.Lock()
	all := make([]Peer, 0, len(t.peers[key]))
	for id, p := range t.peers[key] {
		if id != except {
			all = append(all, p)
		}
	}
	t.mu.Unlock()
	sort.Slice(all, func(i, j int) bool {
		if !all[i].Seen.Equal(all[j].Seen) {
			return all[i].Seen.After(all[j].Seen)
		}
		return all[i].ID < all[j].ID
	})
	return all[:min(len(all), max)]
}
