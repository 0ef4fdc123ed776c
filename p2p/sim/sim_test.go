package sim

import (
	"testing"
	"time"

	"github.com/registry-proxy/registry-proxy/p2p/collector"
)

func TestSmallCluster(t *testing.T) {
	const size = 64 << 20
	base := Config{Nodes: 8, Size: size, Up: 25e6, Down: 25e6, OriginUp: 25e6, Latency: time.Millisecond, Seed: 1}
	for _, tc := range []struct {
		selector    string
		maxUpstream int64
	}{
		{collector.SelectorState, size},
		{collector.SelectorFCFS, size},
		{Direct, 8 * size},
	} {
		t.Run(tc.selector, func(t *testing.T) {
			cfg := base
			cfg.Selector = tc.selector
			res := simulate(t, cfg)
			if res.UpstreamBytes < size-16 || res.UpstreamBytes > tc.maxUpstream+16 {
				t.Errorf("upstream sent %d bytes, want %d to %d", res.UpstreamBytes, int64(size), tc.maxUpstream)
			}
			// No node can beat its own download link.
			floor := time.Duration(float64(size) / base.Down * 1e9)
			for k, c := range res.Completion {
				if c < floor || c > time.Minute {
					t.Errorf("node %d took %v, outside [%v, 1m]", k, c, floor)
				}
			}
			var peer int64
			for _, b := range res.SentBy {
				peer += b
			}
			// Every node got the blob once; pieces moved off a slow parent
			// halfway cost what had been sent (FCFS, which piles children on
			// the first announcer, moves the most: up to about 26% in 30
			// runs). Flow progress is float arithmetic: a byte per piece.
			if want := int64(8*size) - res.UpstreamBytes; peer < want-16 || peer > want*3/2 {
				t.Errorf("peers sent %d bytes, want %d to %d", peer, want, want*3/2)
			}
			t.Logf("%s: p50 %v max %v bound %v upstream %.3f×", tc.selector, Quantile(res.Completion, .5),
				Quantile(res.Completion, 1), res.Bound, float64(res.UpstreamBytes)/size)
		})
	}
}

func TestBound(t *testing.T) {
	for _, tc := range []struct {
		name       string
		size       int64
		origin     float64
		ups, downs []float64
		want       time.Duration
	}{
		{"origin limited", 100, 10, []float64{100, 100}, []float64{100, 100}, 10 * time.Second},
		{"download limited", 100, 1000, []float64{100, 100}, []float64{100, 20}, 5 * time.Second},
		{"swarm limited", 100, 30, []float64{10, 10, 10, 10, 10, 10, 10, 10, 10}, []float64{1000, 1000, 1000, 1000, 1000, 1000, 1000, 1000, 1000}, 7500 * time.Millisecond},
	} {
		if got := Bound(tc.size, tc.origin, tc.ups, tc.downs); got != tc.want {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
}
