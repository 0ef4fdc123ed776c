// Package owner picks, for each digest, the node that fetches it from the
// upstream: rendezvous (highest random weight) hashing over the live members.
// Every node computes the same order from the same member list, and when a
// member leaves only its own digests move.
package owner

import (
	"crypto/sha256"
	"encoding/binary"
	"sort"
)

// Rank returns the members in rendezvous order for key: the owner first, then
// who takes over if it is down.
func Rank(key string, members []string) []string {
	type scored struct {
		id    string
		score uint64
	}
	s := make([]scored, len(members))
	for i, m := range members {
		s[i] = scored{m, score(m, key)}
	}
	sort.Slice(s, func(i, j int) bool {
		if s[i].score != s[j].score {
			return s[i].score > s[j].score
		}
		return s[i].id < s[j].id
	})
	out := make([]string, len(s))
	for i := range s {
		out[i] = s[i].id
	}
	return out
}

// Of is key's owner, Rank(key, members)[0], without ranking the others; ""
// without members.
func Of(key string, members []string) string {
	best, bestScore := "", uint64(0)
	for _, m := range members {
		sc := score(m, key)
		if best == "" || sc > bestScore || (sc == bestScore && m < best) {
			best, bestScore = m, sc
		}
	}
	return best
}

func score(member, key string) uint64 {
	h := sha256.Sum256([]byte(member + "\x00" + key))
	return binary.BigEndian.Uint64(h[:8])
}
