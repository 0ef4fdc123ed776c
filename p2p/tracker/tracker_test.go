package tracker

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"time"
)

func TestPeers(t *testing.T) {
	t0 := time.Unix(1000, 0)
	tr := New(rand.New(rand.NewPCG(1, 2)))
	for i := range 10 {
		tr.Register("d", Peer{ID: fmt.Sprint("n", i), Addr: fmt.Sprint("A", i), Seen: t0}, 0)
	}
	tr.Register("other", Peer{ID: "x", Addr: "X", Seen: t0}, 0)
	tr.Register("d", Peer{ID: "n3", Addr: "A3-new", Seen: t0.Add(time.Second)}, 0) // refresh

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
		tr.Register("d", Peer{ID: fmt.Sprint("n", i), Seen: time.Unix(int64(i), 0)}, 0)
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

// Hold replaces a node's holdings: Peers hands holders out beside the
// registrants (once each), Holders and Held count them, and an empty
// announcement withdraws them.
func TestHold(t *testing.T) {
	tr := New(rand.New(rand.NewPCG(1, 2)))
	tr.Register("d1", Peer{ID: "reg", Addr: "R"}, 0)
	tr.Register("d1", Peer{ID: "both", Addr: "B"}, 0)
	tr.Hold(Peer{ID: "h1", Addr: "H1"}, []string{"d1", "d2"})
	tr.Hold(Peer{ID: "both", Addr: "B"}, []string{"d1"})
	for _, tc := range []struct {
		key, except string
		holders     []string
		peers       int
	}{
		{"d1", "", []string{"both", "h1"}, 3},
		{"d1", "h1", []string{"both", "h1"}, 2},
		{"d2", "", []string{"h1"}, 1},
		{"d3", "", []string{}, 0},
	} {
		if got := tr.Holders(tc.key); fmt.Sprint(got) != fmt.Sprint(tc.holders) {
			t.Errorf("Holders(%s) = %v, want %v", tc.key, got, tc.holders)
		}
		if got := tr.Peers(tc.key, tc.except, 10); len(got) != tc.peers {
			t.Errorf("Peers(%s, %q) = %v, want %d peers", tc.key, tc.except, got, tc.peers)
		}
	}
	if n := tr.Held(); n != 3 {
		t.Errorf("Held = %d, want 3", n)
	}
	tr.Hold(Peer{ID: "h1", Addr: "H1"}, []string{"d2"}) // d1 no longer held by h1
	if got := tr.Holders("d1"); fmt.Sprint(got) != "[both]" {
		t.Errorf("after h1 dropped d1: Holders(d1) = %v", got)
	}
	tr.Hold(Peer{ID: "h1", Addr: "H1"}, nil)
	tr.Hold(Peer{ID: "both", Addr: "B"}, nil)
	if n := tr.Held(); n != 0 || len(tr.Holders("d2")) != 0 {
		t.Errorf("after withdrawing: Held = %d, Holders(d2) = %v", n, tr.Holders("d2"))
	}
	if got := tr.Peers("d1", "", 10); len(got) != 2 {
		t.Errorf("registrants gone with the holdings: %v", got)
	}
}

// Retain forgets nodes that left: their registrations and holdings, and
// keys nobody else has.
func TestRetain(t *testing.T) {
	tr := New(rand.New(rand.NewPCG(1, 2)))
	tr.Register("d1", Peer{ID: "gone", Addr: "G"}, 0)
	tr.Register("d1", Peer{ID: "here", Addr: "H"}, 0)
	tr.Register("d2", Peer{ID: "gone", Addr: "G"}, 0)
	tr.Hold(Peer{ID: "gone", Addr: "G"}, []string{"d3", "d1"})
	tr.Hold(Peer{ID: "here", Addr: "H"}, []string{"d3"})
	tr.Retain(map[string]bool{"here": true})
	if got := tr.Peers("d1", "", 10); len(got) != 1 || got[0].ID != "here" {
		t.Errorf("d1: %v, want only here", got)
	}
	if got := tr.Peers("d2", "", 10); len(got) != 0 {
		t.Errorf("d2: %v, want nobody", got)
	}
	if got := tr.Holders("d3"); fmt.Sprint(got) != "[here]" || tr.Held() != 1 {
		t.Errorf("holders of d3 %v, held %d; want [here], 1", got, tr.Held())
	}
	if len(tr.peers) != 1 || len(tr.holders) != 1 {
		t.Errorf("keys left with nobody are kept: %d registered, %d held", len(tr.peers), len(tr.holders))
	}
}

// BenchmarkPeers is the owner's cost of one Register of a blob a whole
// cluster pulls: every node registers again at each refresh.
func BenchmarkPeers(b *testing.B) {
	for _, n := range []int{100, 1000, 2600} {
		b.Run(fmt.Sprint("registered=", n), func(b *testing.B) {
			tr := New(rand.New(rand.NewPCG(1, 2)))
			for i := range n {
				tr.Register("d", Peer{ID: fmt.Sprint("node-", i), Addr: fmt.Sprint("10.0.0.", i)}, 0)
			}
			b.ReportAllocs()
			for b.Loop() {
				tr.Peers("d", "node-7", 32)
			}
		})
	}
}

// Registrations, holdings and departures in any order: a sample larger
// than the set is the whole set (registered and holding nodes, each once,
// the excepted one left out), a smaller one a part of it, as a plain map
// of the same operations says.
func TestPeersAfterChanges(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	tr := New(rand.New(rand.NewPCG(7, 8)))
	registered, holding := map[string]bool{}, map[string]bool{}
	id := func() string { return fmt.Sprint("n", rng.IntN(40)) }
	for step := range 2000 {
		switch op := rng.IntN(10); {
		case op < 5:
			n := id()
			tr.Register("d", Peer{ID: n, Addr: n}, 0)
			registered[n] = true
		case op < 7:
			n := id()
			tr.Hold(Peer{ID: n, Addr: n}, []string{"d"})
			holding[n] = true
		case op < 8:
			n := id()
			tr.Hold(Peer{ID: n, Addr: n}, nil)
			delete(holding, n)
		default:
			gone := id()
			live := map[string]bool{}
			for i := range 40 {
				if n := fmt.Sprint("n", i); n != gone {
					live[n] = true
				}
			}
			tr.Retain(live)
			delete(registered, gone)
			delete(holding, gone)
		}
		except := id()
		want := map[string]bool{}
		for n := range registered {
			want[n] = true
		}
		for n := range holding {
			want[n] = true
		}
		delete(want, except)
		all := tr.Peers("d", except, 100)
		some := tr.Peers("d", except, 3)
		got := map[string]bool{}
		for _, p := range all {
			if got[p.ID] || !want[p.ID] {
				t.Fatalf("step %d: Peers = %v: %s repeated or not registered nor holding (want %v)", step, all, p.ID, want)
			}
			got[p.ID] = true
		}
		if len(got) != len(want) {
			t.Fatalf("step %d: Peers = %v, want all of %v", step, all, want)
		}
		if len(some) != min(3, len(want)) {
			t.Fatalf("step %d: a sample of 3 = %v, of %d", step, some, len(want))
		}
		for _, p := range some {
			if !want[p.ID] {
				t.Fatalf("step %d: sample names %s, not in %v", step, p.ID, want)
			}
		}
	}
}

// Nodes registering one after another, each handed 8 of those before it:
// no registrant is handed out much more than the others. A plain random
// sample hands the k-th about 8 × ln(n/k) times, the first ones nearly 50
// times here and the last ones almost never.
func TestPeersEvenAsNodesArrive(t *testing.T) {
	const n, k = 400, 8
	tr := New(rand.New(rand.NewPCG(5, 6)))
	named := map[string]int{}
	for i := range n {
		id := fmt.Sprint("n", i)
		for _, p := range tr.Peers("d", id, k) {
			named[p.ID]++
		}
		tr.Register("d", Peer{ID: id}, 0)
	}
	// The last registrants have had few chances to be handed out: judge
	// the first three quarters.
	lo, hi := n*k, 0
	for i := range 3 * n / 4 {
		c := named[fmt.Sprint("n", i)]
		lo, hi = min(lo, c), max(hi, c)
	}
	t.Logf("handed out per node, first %d registrants: min %d, max %d", 3*n/4, lo, hi)
	if lo < 1 || hi > 2*k {
		t.Errorf("handed out between %d and %d times each, want within [1, %d]", lo, hi, 2*k)
	}
}

// Registrations that arrive together are served one after another: each
// is named up to limit of the nodes registered before it, so the k-th
// (from 0) gets min(k, limit) peers, and each of them was registered
// before it. Named and added apart, a burst named only the nodes before
// the burst, and many got as few peers as the first of them.
func TestRegisterConcurrent(t *testing.T) {
	const n, limit = 300, 8
	tr := New(rand.New(rand.NewPCG(5, 6)))
	got := make([][]Peer, n)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			<-start
			got[i] = tr.Register("d", Peer{ID: fmt.Sprint("n", i)}, limit)
		})
	}
	close(start)
	wg.Wait()
	sizes := make([]int, n)
	for i, ps := range got {
		sizes[i] = len(ps)
		for _, p := range ps {
			if p.ID == fmt.Sprint("n", i) {
				t.Fatalf("n%d was named itself", i)
			}
		}
	}
	slices.Sort(sizes)
	for k, size := range sizes {
		if want := min(k, limit); size != want {
			t.Fatalf("the %d-th registration got %d peers, want %d (sizes %v)", k, size, want, sizes[:min(len(sizes), 3*limit)])
		}
	}
	if reg := tr.Peers("d", "", 2*n); len(reg) != n {
		t.Errorf("%d registered, want %d", len(reg), n)
	}
}
