package sim

import (
	"cmp"
	"container/heap"
	"context"
	"slices"
	"sync"
	"time"
)

// network moves bytes between hosts. Each transfer is a flow limited by its
// sender's upload and its receiver's download capacity. When a flow starts
// or ends, the flows at its two ends get new rates by water-filling: each
// end's capacity is shared equally, except that a flow never gets more than
// the room its other end leaves it. This approximates the max-min fair
// shares that TCP flows settle at, but only recomputes the two hosts an
// event touches, which keeps an event cheap at thousands of hosts; flows
// further away catch up at their own next event.
type network struct {
	step   time.Duration // transfers end on its multiples; 0: exactly
	mu     sync.Mutex
	heap   flowHeap
	capped []capped // fill's buffer
	kick   chan struct{}
	total  int64 // flows ever started
}

type host struct {
	up, down         float64 // bytes/s
	ups, downs       []*flow
	upRate, downRate float64 // sums of the flows' rates
	sent, recv       float64 // bytes of finished flows
}

type flow struct {
	src, dst     *host
	remaining    float64
	rate         float64
	at           time.Time // remaining is as of at
	eta          time.Time // when it ends at its rate (while in the heap)
	heapIx       int       // its place in the heap; -1: not there
	upIx, downIx int
	finished     bool
	done         chan struct{}
}

func newNetwork(step time.Duration) *network {
	return &network{step: step, kick: make(chan struct{}, 1)}
}

// transfer moves n bytes from src to dst; it returns when they arrived or
// ctx ended.
func (nw *network) transfer(ctx context.Context, src, dst *host, n int64) error {
	f := &flow{src: src, dst: dst, remaining: float64(n), heapIx: -1, done: make(chan struct{})}
	nw.mu.Lock()
	now := time.Now()
	nw.total++
	f.upIx, f.downIx = len(src.ups), len(dst.downs)
	src.ups = append(src.ups, f)
	dst.downs = append(dst.downs, f)
	f.at = now
	nw.reschedule(now, src, dst)
	nw.mu.Unlock()
	select {
	case nw.kick <- struct{}{}:
	default:
	}
	select {
	case <-f.done:
		return nil
	case <-ctx.Done():
		nw.mu.Lock()
		if !f.finished {
			nw.remove(time.Now(), f)
		}
		nw.mu.Unlock()
		return ctx.Err()
	}
}

// counters returns the bytes a host sent and received so far, counting the
// progress of flows still running.
func (nw *network) counters(h *host) (rx, tx uint64) {
	nw.mu.Lock()
	defer nw.mu.Unlock()
	now := time.Now()
	sent, recv := h.sent, h.recv
	for _, f := range h.ups {
		sent += f.progressAt(now)
	}
	for _, f := range h.downs {
		recv += f.progressAt(now)
	}
	return uint64(recv), uint64(sent)
}

func (f *flow) progressAt(now time.Time) float64 {
	return min(f.rate*now.Sub(f.at).Seconds(), f.remaining)
}

// settle brings f's remaining bytes to now.
func (f *flow) settle(now time.Time) {
	p := f.progressAt(now)
	f.remaining -= p
	f.src.sent += p
	f.dst.recv += p
	f.at = now
}

func (nw *network) remove(now time.Time, f *flow) {
	f.settle(now)
	f.finished = true
	f.src.upRate -= f.rate
	f.dst.downRate -= f.rate
	f.rate = 0
	if f.heapIx >= 0 {
		heap.Remove(&nw.heap, f.heapIx)
	}
	s, d := f.src, f.dst
	last := s.ups[len(s.ups)-1]
	s.ups[f.upIx], last.upIx = last, f.upIx
	s.ups = s.ups[:len(s.ups)-1]
	last = d.downs[len(d.downs)-1]
	d.downs[f.downIx], last.downIx = last, f.downIx
	d.downs = d.downs[:len(d.downs)-1]
	nw.reschedule(now, s, d)
}

// reschedule gives new rates to the flows at src's uploads and dst's
// downloads.
//
// A flow's room at its other end is what the other flows there leave it,
// but at least an equal share of that end: else a flow that starts where
// both ends are full (an upstream piece at a reader whose download its
// peers fill) would get nothing until one of them changed, where TCP gives
// it its share. An end whose flows that share overcommits gets its flows
// shared again (one level: what that frees elsewhere waits for an event
// there), so no host ever sends or receives above its capacity.
func (nw *network) reschedule(now time.Time, src, dst *host) {
	for _, set := range [][]*flow{src.ups, dst.downs} {
		for _, f := range set {
			f.settle(now)
		}
	}
	nw.fill(now, src.ups, src.up, downRoom)
	for _, f := range src.ups {
		if h := f.dst; h.downRate > h.down*(1+1e-9) {
			nw.refill(now, h.downs, h.down)
		}
	}
	nw.fill(now, dst.downs, dst.down, upRoom)
	for _, f := range dst.downs {
		if h := f.src; h.upRate > h.up*(1+1e-9) {
			nw.refill(now, h.ups, h.up)
		}
	}
}

// downRoom is f's room at its receiver: what the receiver's other flows
// leave, or its equal share there.
func downRoom(f *flow) float64 {
	h := f.dst
	return max(h.down-(h.downRate-f.rate), h.down/float64(len(h.downs)))
}

// upRoom is f's room at its sender.
func upRoom(f *flow) float64 {
	h := f.src
	return max(h.up-(h.upRate-f.rate), h.up/float64(len(h.ups)))
}

// refill shares capacity among flows again, none above its rate now: the
// end's flows back within its capacity, nothing more anywhere.
func (nw *network) refill(now time.Time, flows []*flow, capacity float64) {
	for _, f := range flows {
		f.settle(now)
	}
	nw.fill(now, flows, capacity, func(f *flow) float64 { return f.rate })
}

// fill shares capacity among flows, each at most its room at the other end.
func (nw *network) fill(now time.Time, flows []*flow, capacity float64, room func(*flow) float64) {
	cs := nw.capped[:0]
	for _, f := range flows {
		cs = append(cs, capped{f, max(room(f), 0)})
	}
	nw.capped = cs
	slices.SortFunc(cs, func(a, b capped) int { return cmp.Compare(a.room, b.room) })
	left := capacity
	for k, c := range cs {
		r := min(c.room, left/float64(len(cs)-k))
		left -= r
		f := c.f
		f.src.upRate += r - f.rate
		f.dst.downRate += r - f.rate
		f.rate = r
		// A rate of float residue would overflow the clock: such a flow
		// waits for the next event at its ends, as one at rate 0 does.
		secs := f.remaining / r
		if r <= 0 || secs >= 1e6 {
			if f.heapIx >= 0 {
				heap.Remove(&nw.heap, f.heapIx)
			}
			continue
		}
		eta := now.Add(time.Duration(secs*1e9) + 1)
		if nw.step > 0 {
			if t := eta.Truncate(nw.step); t.Before(eta) {
				eta = t.Add(nw.step)
			}
		}
		f.eta = eta
		if f.heapIx >= 0 {
			heap.Fix(&nw.heap, f.heapIx)
		} else {
			heap.Push(&nw.heap, f)
		}
	}
}

// capped is a flow and its room at the other end, as fill sorts them.
type capped struct {
	f    *flow
	room float64
}

// run completes flows at their time until ctx ends.
//
// It never resets a timer: the runtime marks a reset timer modified, and
// the next timer check then scans every timer of the bubble
// (runtime.timers.adjust), a scan per flow event that took 12% of a
// 1,000-node run. A new timer goes out when the next completion moves
// earlier than the one pending; a timer that is no longer the next only
// wakes the loop once for nothing.
func (nw *network) run(ctx context.Context) {
	var pending time.Time // when the last timer started fires; zero: none
	wake := func() {
		select {
		case nw.kick <- struct{}{}:
		default:
		}
	}
	for {
		nw.mu.Lock()
		now := time.Now()
		for nw.heap.Len() > 0 && !nw.heap[0].eta.After(now) {
			f := nw.heap[0]
			nw.remove(now, f) // takes it off the heap
			close(f.done)
		}
		if !pending.After(now) {
			pending = time.Time{}
		}
		if nw.heap.Len() > 0 {
			if at := nw.heap[0].eta; pending.IsZero() || at.Before(pending) {
				pending = at
				time.AfterFunc(at.Sub(now), wake)
			}
		}
		nw.mu.Unlock()
		select {
		case <-ctx.Done():
			return
		case <-nw.kick:
		}
	}
}

// flowHeap holds the flows with a rate, soonest end first; each flow knows
// its place, so a new rate moves it instead of leaving a stale entry behind.
type flowHeap []*flow

func (h flowHeap) Len() int           { return len(h) }
func (h flowHeap) Less(i, j int) bool { return h[i].eta.Before(h[j].eta) }
func (h flowHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].heapIx, h[j].heapIx = i, j
}
func (h *flowHeap) Push(x any) {
	f := x.(*flow)
	f.heapIx = len(*h)
	*h = append(*h, f)
}
func (h *flowHeap) Pop() any {
	old := *h
	f := old[len(old)-1]
	old[len(old)-1] = nil
	f.heapIx = -1
	*h = old[:len(old)-1]
	return f
}
