package tracker

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"
)

// clock is an injected clock.
type clock struct{ t time.Time }

func (c *clock) now() time.Time { return c.t }

// count is the registrations actually held, to check the counters against.
func (t *Tracker) count() (regs int, perPeer map[string]int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	perPeer = map[string]int{}
	for _, ps := range t.peers {
		for _, p := range ps.list {
			regs++
			perPeer[p.ID]++
		}
	}
	return regs, perPeer
}

// Caps per node and in all refuse new registrations, not refreshes; a
// refused one records nothing; admit is asked only of new ones.
func TestRegisterLimits(t *testing.T) {
	c := &clock{time.Unix(1e6, 0)}
	tr := New(rand.New(rand.NewPCG(1, 2)))
	tr.SetLimits(Limits{PerPeer: 10, Total: 25, Now: c.now})
	asked := 0
	admit := func() error { asked++; return nil }
	for i := range 10 {
		if _, err := tr.TryRegister(fmt.Sprint("d", i), Peer{ID: "a", Seen: c.t}, 4, admit); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := tr.TryRegister("d10", Peer{ID: "a", Seen: c.t}, 4, admit); !errors.Is(err, ErrFull) {
		t.Fatalf("11th registration of a: %v, want ErrFull", err)
	}
	if _, err := tr.TryRegister("d3", Peer{ID: "a", Seen: c.t}, 4, admit); err != nil {
		t.Fatalf("a refresh at the cap: %v", err)
	}
	if asked != 10 {
		t.Errorf("admit asked %d times, want 10 (new registrations that fit only)", asked)
	}
	if got := tr.Peers("d10", "", 10); len(got) != 0 {
		t.Errorf("refused registration recorded: %v", got)
	}
	for _, id := range []string{"b", "c"} {
		for i := range 10 {
			_, err := tr.TryRegister(fmt.Sprint("d", i), Peer{ID: id, Seen: c.t}, 4, nil)
			if want := id == "b" || i < 5; (err == nil) != want {
				t.Fatalf("%s d%d: %v, want accepted %v (total cap 25)", id, i, err, want)
			}
		}
	}
	// admit's error refuses, and nothing is recorded.
	tr.Retain(map[string]bool{"a": true})
	no := errors.New("no")
	if _, err := tr.TryRegister("x", Peer{ID: "z", Seen: c.t}, 4, func() error { return no }); err != no {
		t.Fatalf("admit's refusal: %v", err)
	}
	if n, per := tr.count(); n != tr.Registered() || n != 10 || per["z"] != 0 {
		t.Errorf("registered %d (counter %d), per node %v; want 10 of a", n, tr.Registered(), per)
	}
}

// Registrations and holdings expire on the injected clock, at the next
// write past sweepEvery, at a cap, or on Retain.
func TestExpiry(t *testing.T) {
	c := &clock{time.Unix(1e6, 0)}
	tr := New(rand.New(rand.NewPCG(1, 2)))
	tr.SetLimits(Limits{PerPeer: 3, RegisterTTL: 30 * time.Minute, HoldTTL: 15 * time.Minute, Now: c.now})
	for i := range 3 {
		tr.Register(fmt.Sprint("d", i), Peer{ID: "a", Seen: c.t}, 0)
	}
	if err := tr.TryHold(Peer{ID: "h", Seen: c.t}, []string{"d0", "d1"}); err != nil {
		t.Fatal(err)
	}
	c.t = c.t.Add(20 * time.Minute)
	tr.Register("d0", Peer{ID: "a", Seen: c.t}, 0) // refreshed
	if _, err := tr.TryRegister("d9", Peer{ID: "a", Seen: c.t}, 0, nil); !errors.Is(err, ErrFull) {
		t.Fatalf("at the cap with nothing expired: %v", err)
	}
	if tr.Held() != 0 || len(tr.Holders("d0")) != 0 {
		t.Errorf("holdings 20 min old kept: %d", tr.Held())
	}
	c.t = c.t.Add(15 * time.Minute) // d1, d2 35 min old; d0 15
	if _, err := tr.TryRegister("d9", Peer{ID: "a", Seen: c.t}, 0, nil); err != nil {
		t.Fatalf("at the cap with two expired: %v", err)
	}
	if n, _ := tr.count(); n != 2 || tr.Registered() != 2 {
		t.Errorf("%d registrations (counter %d), want d0 and d9", n, tr.Registered())
	}
	c.t = c.t.Add(time.Hour)
	tr.Retain(map[string]bool{"a": true})
	if n, _ := tr.count(); n != 0 || tr.Registered() != 0 || len(tr.regs) != 0 {
		t.Errorf("after an hour: %d registrations (counter %d, per node %v)", n, tr.Registered(), tr.regs)
	}
}

// Holdings over the per-node or total cap are refused whole, keeping what
// the node announced before; a smaller announcement always fits.
func TestHoldLimits(t *testing.T) {
	tr := New(rand.New(rand.NewPCG(1, 2)))
	tr.SetLimits(Limits{HeldPerPeer: 5, HeldTotal: 8})
	keys := func(n int) []string {
		var k []string
		for i := range n {
			k = append(k, fmt.Sprint("d", i))
		}
		return k
	}
	if err := tr.TryHold(Peer{ID: "a"}, keys(5)); err != nil {
		t.Fatal(err)
	}
	if err := tr.TryHold(Peer{ID: "a"}, keys(6)); !errors.Is(err, ErrFull) {
		t.Fatalf("6 of a: %v", err)
	}
	if err := tr.TryHold(Peer{ID: "b"}, keys(4)); !errors.Is(err, ErrFull) {
		t.Fatalf("9 in all: %v", err)
	}
	if err := tr.TryHold(Peer{ID: "b"}, keys(3)); err != nil {
		t.Fatal(err)
	}
	if err := tr.TryHold(Peer{ID: "a"}, keys(2)); err != nil {
		t.Fatal(err)
	}
	if tr.Held() != 5 || len(tr.Holders("d4")) != 0 || len(tr.Holders("d1")) != 2 {
		t.Errorf("Held %d, holders of d4 %v, d1 %v", tr.Held(), tr.Holders("d4"), tr.Holders("d1"))
	}
}

// Many nodes at once against the caps: the counters stay exact (run with
// -race).
func TestLimitsConcurrent(t *testing.T) {
	c := time.Unix(1e6, 0)
	tr := New(nil)
	tr.SetLimits(Limits{PerPeer: 50, Total: 1000, HeldPerPeer: 20, HeldTotal: 300, RegisterTTL: time.Minute, HoldTTL: time.Minute, Now: func() time.Time { return c }})
	done := make(chan int)
	for m := range 40 {
		go func() {
			ok := 0
			id := fmt.Sprint("m", m)
			for i := range 200 {
				if _, err := tr.TryRegister(fmt.Sprint("d", i%70), Peer{ID: id, Seen: c}, 8, nil); err == nil {
					ok++
				}
				if i%20 == 0 {
					_ = tr.TryHold(Peer{ID: id, Seen: c}, []string{fmt.Sprint("h", i), fmt.Sprint("h", m)})
				}
			}
			done <- ok
		}()
	}
	for range 40 {
		<-done
	}
	n, per := tr.count()
	if n != tr.Registered() || n > 1000 {
		t.Errorf("%d registrations, counter %d, cap 1000", n, tr.Registered())
	}
	for id, k := range per {
		if k > 50 || tr.regs[id] != k {
			t.Errorf("%s: %d registrations, counter %d, cap 50", id, k, tr.regs[id])
		}
	}
	if tr.Held() > 300 {
		t.Errorf("held %d, cap 300", tr.Held())
	}
}
