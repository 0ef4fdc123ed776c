package swarm

import (
	"cmp"
	"slices"
	"sync"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/p2p/owner"
)

// Delegations decide, at a digest's owner, which pieces registering nodes
// read from the upstream themselves. Every byte a cluster pulls first leaves
// the cluster's upstream readers through their uploads. With one reader, the
// owner, its upload has to carry a first copy of each piece as fast as the
// upstream sends: with equal links it has no slack, so any piece it sends
// twice delays every node, and a slow owner caps the cluster however fast
// the rest are.
//
// So when the first member fit to read registers, the owner plans once, for
// the blob's pieces it has not started, a split between the readers: itself
// and the members whose upload is at least 1/Factor of the fastest's, the
// Readers fastest of them (ties by rendezvous order for the digest, the
// owner first), weighted by upload and interleaved over the blob. Each
// member claims its share when it registers; the owner keeps its own and
// the shares nobody claimed, and takes claimed pieces from their claimants.
// Each piece is still read from the upstream about once.
type Delegations struct {
	// Factor: a node reads when its upload is at least 1/Factor of the
	// fastest reader's (default 2).
	Factor float64
	// Readers: at most this many nodes read a blob from the upstream
	// (default 4; config pieces.readers): each more delays every
	// reader's first piece (they share the upstream) and opens more
	// connections to the registry, for less slack gained each time.
	Readers int
	// Now is the clock; time.Now when nil.
	Now func() time.Time

	mu sync.Mutex
	by *lru.Cache[digest.Digest, *delegation]
}

// readersFor is how long the owner keeps a digest's reader set while no
// reader has registered: every node pulling registers in the first moments,
// and choosing the readers reads every member's upload and ranks them all
// (2.1 ms a registration at 2,600 members, under the lock), which would keep
// most of them past their Register timeout.
const readersFor = time.Second

type delegation struct {
	// Before the plan: the readers chosen, and when.
	readers   []*member
	readersAt time.Time
	planned   map[string][]int // by member; nil until a reader registers
	claimed   map[string][]int // the pieces each claimant got
}

// Register is the owner's side of one registration by node for d: the
// pieces node is to read from the upstream (RegisterResponse's
// upstream_pieces), the same each time it registers again; the first time,
// dl (the owner's download) leaves them to it. done are the pieces the
// owner holds, ownerUp its upload capacity in bytes/s; uploads lists the
// other members' capacities (0: unknown), asked only to make the plan.
func (ds *Delegations) Register(dl Downloads, d digest.Digest, done []bool, node string, ownerUp float64, uploads func() map[string]float64) []uint32 {
	fetching, _, _ := dl.Progress(d)
	busy := make([]bool, len(done))
	for _, i := range fetching {
		if i >= 0 && i < len(busy) {
			busy[i] = true
		}
	}
	pieces, fresh := ds.claim(d, len(done), node, ownerUp, uploads, func(i int) bool { return !done[i] && !busy[i] })
	if fresh {
		dl.Delegate(d, pieces, node)
	}
	return toUint32(pieces)
}

// claim returns node's share of d (fresh the first time), planning the
// split when node is the first member fast enough to register.
func (ds *Delegations) claim(d digest.Digest, count int, node string, ownerUp float64, uploads func() map[string]float64, free func(int) bool) (pieces []int, fresh bool) {
	ds.mu.Lock()
	defer ds.mu.Unlock()
	if ds.by == nil {
		ds.by, _ = lru.New[digest.Digest, *delegation](4096)
	}
	dl, ok := ds.by.Get(d)
	if ok && dl.planned != nil {
		if pieces, ok := dl.claimed[node]; ok {
			return pieces, false
		}
		// The plan's share for node, less what the owner started since.
		pieces = slices.DeleteFunc(dl.planned[node], func(i int) bool { return !free(i) })
		delete(dl.planned, node)
		dl.claimed[node] = pieces
		return pieces, len(pieces) > 0
	}
	now := time.Now()
	if ds.Now != nil {
		now = ds.Now()
	}
	if !ok || now.Sub(dl.readersAt) >= readersFor {
		dl = &delegation{readers: ds.readers(d, ownerUp, uploads()), readersAt: now}
		ds.by.Add(d, dl)
	}
	members := dl.readers
	if !slices.ContainsFunc(members, func(m *member) bool { return m.id == node }) {
		return nil, false // no plan yet: a node fit to read may still come
	}
	var total float64
	for _, m := range members {
		total += m.weight
	}
	// Smooth weighted round robin: each member gets pieces in proportion
	// to its upload, interleaved over the blob.
	dl.readers, dl.planned, dl.claimed = nil, map[string][]int{}, map[string][]int{}
	for i := range count {
		if !free(i) {
			continue
		}
		var best *member
		for _, m := range members {
			m.credit += m.weight
			if best == nil || m.credit > best.credit {
				best = m
			}
		}
		best.credit -= total
		dl.planned[best.id] = append(dl.planned[best.id], i)
	}
	delete(dl.planned, self) // the owner's own share: it just keeps it
	pieces = dl.planned[node]
	delete(dl.planned, node)
	dl.claimed[node] = pieces
	return pieces, len(pieces) > 0
}

// Claimants lists the nodes that claimed pieces of d to read from the
// upstream, in no particular order.
func (ds *Delegations) Claimants(d digest.Digest) []string {
	ds.mu.Lock()
	defer ds.mu.Unlock()
	if ds.by == nil {
		return nil
	}
	dl, ok := ds.by.Peek(d)
	if !ok {
		return nil
	}
	var out []string
	for id, pieces := range dl.claimed {
		if len(pieces) > 0 {
			out = append(out, id)
		}
	}
	return out
}

// self stands for the owner among the readers: member ids are never empty.
const self = ""

type member struct {
	id     string
	weight float64
	credit float64
}

// readers are the nodes that read d from the upstream, in a stable order.
func (ds *Delegations) readers(d digest.Digest, ownerUp float64, uploads map[string]float64) []*member {
	factor, most := ds.Factor, ds.Readers
	if factor <= 0 {
		factor = 2
	}
	if most <= 0 {
		most = 4
	}
	if ownerUp <= 0 {
		return nil // the owner's own capacity unknown: nothing to weigh against
	}
	fastest := ownerUp
	for _, up := range uploads {
		fastest = max(fastest, up)
	}
	ids := make([]string, 0, len(uploads))
	for id, up := range uploads {
		if id != self && up*factor >= fastest {
			ids = append(ids, id)
		}
	}
	members := make([]*member, 0, len(ids)+1)
	if ownerUp*factor >= fastest {
		members = append(members, &member{id: self, weight: ownerUp})
	}
	for _, id := range owner.Rank(d.String(), ids) {
		members = append(members, &member{id: id, weight: uploads[id]})
	}
	slices.SortStableFunc(members, func(a, b *member) int { return cmp.Compare(b.weight, a.weight) })
	return members[:min(len(members), most)]
}

func toUint32(v []int) []uint32 {
	out := make([]uint32, len(v))
	for k, i := range v {
		out[k] = uint32(i)
	}
	return out
}
