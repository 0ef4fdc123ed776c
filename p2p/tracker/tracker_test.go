package tracker

import (
	"fmt"
	"math/rand/v2"
	"testing"
	"time"
)

func TestPeers(t *testing.T) {
	t0 := time.Unix(1000, 0)
	tr := New(rand.New(rand.NewPCG(1, 2)))
	for i := range 10 {
		tr.Add("d", Peer{ID: fmt.Sprint("n", i), Addr: fmt.Sprint("A", i), Seen: t0})
	}
	tr.Add("other", Peer{ID: "x", Addr: "X", Seen: t0})
	tr.Add("d", Peer{ID: "n3", Addr: "A3-new", Seen: t0.Add(time.Second)}) // refresh

	for _, tc := range []struct {
		except string
		max    int
		want   int
	}{
		{"", 20, 10}, {"n3", 20, 9}, {"", 4, 4}, {"", 0, 0},
	} {
		got := tr.Peers("d", tc.except, tc.max)
		if len(got) != tc.want {
			t.Errorf("Peers(d, %q, %d): %d peers, want %d", tc.except, tc.max, len(got), tc.want)
		}
		seen := map[string]bool{}
		for _, p := range got {
			if p.ID == tc.except || seen[p.ID] || p.ID == "x" {
				t.Errorf("Peers(d, %q, %d) = %v: excluded, repeated or foreign peer", tc.except, tc.max, got)
			}
			if p.ID == "n3" && p.Addr != "A3-new" {
				t.Errorf("stale address %q for n3", p.Addr)
			}
			seen[p.ID] = true
		}
	}
	if got := tr.Peers("none", "", 5); len(got) != 0 {
		t.Errorf("unknown key: %v", got)
	}
}

// Samples spread over every registrant: no node is left out of (or in)
// every answer.
func TestPeersSpread(t *testing.T) {
	tr := New(rand.New(rand.NewPCG(3, 4)))
	for i := range 100 {
		tr.Add("d", Peer{ID: fmt.Sprint("n", i), Seen: time.Unix(int64(i), 0)})
	}
	count := map[string]int{}
	for range 100 {
		for _, p := range tr.Peers("d", "", 10) {
			count[p.ID]++
		}
	}
	// 1000 picks over 100 nodes: about 10 each.
	for i := range 100 {
		if c := count[fmt.Sprint("n", i)]; c == 0 || c > 30 {
			t.Errorf("n%d named %d times in 100 samples of 10", i, c)
		}
	}
}
