package sim

import (
	"context"
	"math"
	"testing"
	"testing/synctest"
	"time"
)

// startNetwork runs a network in the test's bubble until the test ends.
func startNetwork(t *testing.T, step time.Duration) *network {
	ctx, cancel := context.WithCancel(t.Context())
	nw := newNetwork(step)
	done := make(chan struct{})
	go func() {
		defer close(done)
		nw.run(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	return nw
}

// A flow that starts where both its ends are full gets a share, as TCP
// gives it, and no host sends or receives above its capacity: the upstream
// serving one reader fully, a second reader whose download two peers fill.
func TestFlowBetweenFullEndsGetsItsShare(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx := t.Context()
		nw := startNetwork(t, 0)
		origin := &host{up: 100, down: 1e9}
		reader := &host{up: 1e9, down: 100}
		other := &host{up: 1e9, down: 1000}
		p1, p2 := &host{up: 1000, down: 1e9}, &host{up: 1000, down: 1e9}
		start := func(src, dst *host) {
			go nw.transfer(ctx, src, dst, 1e12) //nolint:errcheck // ends with ctx
			synctest.Wait()
		}
		start(p1, reader)
		start(p2, reader)
		start(origin, other)
		start(origin, reader)

		nw.mu.Lock()
		defer nw.mu.Unlock()
		rate := func(src, dst *host) float64 {
			for _, f := range src.ups {
				if f.dst == dst {
					return f.rate
				}
			}
			t.Fatalf("no flow")
			return 0
		}
		// Max-min fair: a third of the reader's download each; the other
		// reader the rest of the upstream.
		for _, c := range []struct {
			name     string
			src, dst *host
			want     float64
		}{
			{"upstream to the reader", origin, reader, 100.0 / 3},
			{"peer 1 to the reader", p1, reader, 100.0 / 3},
			{"peer 2 to the reader", p2, reader, 100.0 / 3},
			{"upstream to the other reader", origin, other, 200.0 / 3},
		} {
			if got := rate(c.src, c.dst); math.Abs(got-c.want) > 1e-6 {
				t.Errorf("%s: %.2f bytes/s, want %.2f", c.name, got, c.want)
			}
		}
		for name, h := range map[string]*host{"origin": origin, "reader": reader, "other": other, "p1": p1, "p2": p2} {
			if h.upRate > h.up*(1+1e-9) || h.downRate > h.down*(1+1e-9) {
				t.Errorf("%s above capacity: up %.2f of %.0f, down %.2f of %.0f", name, h.upRate, h.up, h.downRate, h.down)
			}
		}
	})
}

// With a step, a transfer ends on a multiple of it, never before its exact
// end and at most a step after; without, at its exact end (within the
// nanosecond the clock rounds up by).
func TestStepRoundsTransferEnds(t *testing.T) {
	for _, tc := range []struct {
		name string
		step time.Duration
	}{
		{"exact", 0},
		{"7ms steps", 7 * time.Millisecond},
		{"20µs steps", 20 * time.Microsecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				ctx := t.Context()
				nw := startNetwork(t, tc.step)
				src, dst := &host{up: 1000, down: 1e9}, &host{up: 1e9, down: 1000}
				start := time.Now()
				exact := start.Add(1501 * time.Millisecond) // 1,501 bytes at 1,000 bytes/s
				if err := nw.transfer(ctx, src, dst, 1501); err != nil {
					t.Fatal(err)
				}
				end := time.Now()
				switch {
				case end.Before(exact):
					t.Fatalf("ended %v early", exact.Sub(end))
				case tc.step == 0 && end.Sub(exact) > time.Microsecond:
					t.Fatalf("ended %v late without a step", end.Sub(exact))
				case tc.step > 0 && (end.Sub(exact) > tc.step || !end.Truncate(tc.step).Equal(end)):
					t.Fatalf("ended %v after the exact end, not on a %v step", end.Sub(exact), tc.step)
				}
			})
		})
	}
}

// A flow's end moves with its rate: flows that start, end or are cancelled
// at a shared sender give the others new ends, each flow is in the heap
// once while it has a rate, and the heap is empty when all have ended.
func TestFlowEndsMoveWithRates(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx := t.Context()
		nw := startNetwork(t, 0)
		src := &host{up: 1000, down: 1e9}
		a, b, c := &host{up: 1e9, down: 1e9}, &host{up: 1e9, down: 1e9}, &host{up: 1e9, down: 1e9}
		start := time.Now()
		ends := make(chan string, 2)
		go func() {
			if err := nw.transfer(ctx, src, a, 1000); err == nil {
				ends <- "a"
			}
		}()
		time.Sleep(500 * time.Millisecond) // a: 500 bytes left
		go func() {
			if err := nw.transfer(ctx, src, b, 250); err == nil {
				ends <- "b"
			}
		}()
		cctx, ccancel := context.WithCancel(ctx)
		cerr := make(chan error, 1)
		go func() { cerr <- nw.transfer(cctx, src, c, 1e6) }()
		synctest.Wait()
		nw.mu.Lock()
		if n := nw.heap.Len(); n != 3 {
			t.Errorf("%d heap entries for 3 flows", n)
		}
		nw.mu.Unlock()
		// a third each until c is cancelled at 0.6 s; then a half each.
		time.Sleep(100 * time.Millisecond)
		ccancel()
		if err := <-cerr; err == nil {
			t.Fatal("cancelled transfer returned no error")
		}
		// At 0.6 s: a has 500−33.3 left, b 250−33.3. At 500 bytes/s each,
		// b ends at 0.6+0.4333 s; a then has 466.7−216.7 = 250 left at the
		// whole 1,000 bytes/s: it ends 0.25 s later.
		wantB := 600*time.Millisecond + 433333333*time.Nanosecond
		wantA := wantB + 250*time.Millisecond
		for _, want := range []struct {
			name string
			at   time.Duration
		}{{"b", wantB}, {"a", wantA}} {
			got := <-ends
			if at := time.Since(start); got != want.name || (at-want.at).Abs() > time.Microsecond {
				t.Errorf("%s ended at %v, want %s at %v", got, at, want.name, want.at)
			}
		}
		nw.mu.Lock()
		defer nw.mu.Unlock()
		if n := nw.heap.Len(); n != 0 {
			t.Errorf("%d heap entries after every flow ended", n)
		}
	})
}
