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
		h := sha256.Sum256([]byte(m + "\x00" + key))
		s[i] = scored{m, binary.BigEndian.Uint64(h[:8])}
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
