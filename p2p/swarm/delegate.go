package swarm

import (
	"cmp"
	"slices"
	"sync"

	lru "github.com/hashicorp/golang-lru/v2"
	"github.com/opencontainers/go-digest"
)

// Delegations decide, at a digest's owner, which pieces registering nodes
// read from the upstream themselves. Every byte a cluster pulls first leaves
// the cluster's upstream readers through their uploads; with one reader,
// the owner, a slow owner caps every node however fast the rest are.
//
// So when a node that registers uploads at least Factor times faster than
// the owner, the owner plans once, for the blob's pieces it has not
// started, a split between every member that fast (weighted by upload,
// spread evenly over the blob; none for the owner, each of whose pieces
// would have to cross its slow upload first), and each such member claims
// its share when it registers. The owner leaves claimed pieces to their
// claimants and takes them from them; shares nobody claimed stay the
// owner's. Each piece is still read from the upstream about once.
type Delegations struct {
	// Factor: a member qualifies when its upload is at least Factor times
	// the owner's (default 2).
	Factor float64

	mu sync.Mutex
	by *lru.Cache[digest.Digest, *delegation]
}

type delegation struct {
	planned map[string][]int // by member
	claimed map[string][]int // the pieces each claimant got
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
		dl.Delegate(d, pieces)
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
	if ok {
		if pieces, ok := dl.claimed[node]; ok {
			return pieces, false
		}
		// The plan's share for node, less what the owner started since.
		pieces = slices.DeleteFunc(dl.planned[node], func(i int) bool { return !free(i) })
		delete(dl.planned, node)
		dl.claimed[node] = pieces
		return pieces, len(pieces) > 0
	}
	factor := ds.Factor
	if factor <= 0 {
		factor = 2
	}
	if ownerUp <= 0 {
		return nil, false
	}
	all := uploads()
	if all[node] < factor*ownerUp {
		return nil, false // no plan yet: a faster node may still come
	}
	type member struct {
		id     string
		weight float64
		credit float64
	}
	var members []*member
	for id, up := range all {
		if up >= factor*ownerUp {
			members = append(members, &member{id: id, weight: up})
		}
	}
	slices.SortFunc(members, func(a, b *member) int { return cmp.Compare(a.id, b.id) })
	var total float64
	for _, m := range members {
		total += m.weight
	}
	// Smooth weighted round robin: each member gets pieces in proportion
	// to its upload, interleaved over the blob.
	dl = &delegation{planned: map[string][]int{}, claimed: map[string][]int{}}
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
	ds.by.Add(d, dl)
	pieces = dl.planned[node]
	delete(dl.planned, node)
	dl.claimed[node] = pieces
	return pieces, len(pieces) > 0
}

func toUint32(v []int) []uint32 {
	out := make([]uint32, len(v))
	for k, i := range v {
		out[k] = uint32(i)
	}
	return out
}
