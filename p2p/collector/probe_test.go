package collector

import (
	"testing"
	"time"
)

// TestProbe runs rounds against upstreams modelled by the rate they give
// k pieces at once, and checks where the limit settles.
func TestProbe(t *testing.T) {
	const piece = 4 << 20
	for _, tc := range []struct {
		name  string
		rate  func(k int) float64 // bytes/s with k pieces at once
		most  int
		want  int
		setup time.Duration // added to the first piece: the connection's
	}{
		{"a shared link sends no more with more at once", func(int) float64 { return 25e6 }, 8, 1, 0},
		{"an upstream pacing each connection", func(k int) float64 { return float64(k) * 50e6 }, 8, 8, 0},
		{"paced up to a link of three connections", func(k int) float64 { return float64(min(k, 3)) * 50e6 }, 8, 4, 0},
		{"paced up to a link of 1.6 connections", func(k int) float64 { return min(float64(k), 1.6) * 50e6 }, 8, 2, 0},
		{"a competing reader's share (k of k+1 flows)", func(k int) float64 { return 25e6 * float64(k) / float64(k+1) }, 8, 1, 0},
		{"capped by the option", func(k int) float64 { return float64(k) * 50e6 }, 4, 4, 0},
		{"capped by the option, not a power of two", func(k int) float64 { return float64(k) * 50e6 }, 6, 6, 0},
		{"one at most", func(k int) float64 { return float64(k) * 50e6 }, 1, 1, 0},
		{"a shared link behind a slow first piece", func(int) float64 { return 25e6 }, 8, 1, 500 * time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var p probe
			now := time.Unix(0, 0).Add(-tc.setup)
			for range 20 {
				k := p.room(tc.most)
				for range k {
					p.picked(now)
				}
				// k pieces at once, landing together.
				now = now.Add(tc.setup + time.Duration(float64(k*piece)/tc.rate(k)*1e9))
				tc.setup = 0
				for range k {
					p.landed(now, piece, tc.most)
				}
			}
			if got := p.room(tc.most); got != tc.want || !p.settled {
				t.Errorf("settled %v at %d at once, want %d", p.settled, got, tc.want)
			}
		})
	}
	t.Run("a round in no time decides nothing", func(t *testing.T) {
		var p probe
		now := time.Unix(0, 0)
		p.picked(now)
		p.landed(now, piece, 8)
		if p.room(8) != 1 || p.settled {
			t.Errorf("limit %d settled %v after a round of no time", p.room(8), p.settled)
		}
	})
}
