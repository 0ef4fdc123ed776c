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

// A slow owner no longer caps the cluster: it hands faster nodes pieces to
// read from the upstream (swarm.Delegations), which still sends about one
// copy.
func TestSlowOwnerDelegates(t *testing.T) {
	const size = 128 << 20
	cfg := Config{Nodes: 6, Size: size, Up: 25e6, Down: 25e6, OriginUp: 25e6, Latency: time.Millisecond, Seed: 3,
		Selector: collector.SelectorState, Throttled: 2, SlowOwner: true}
	with := simulate(t, cfg)
	cfg.NoDelegation = true
	without := simulate(t, cfg)
	for _, r := range []struct {
		name string
		res  Result
	}{{"delegation", with}, {"owner alone", without}} {
		t.Logf("%s: p50 %v max %v bound %v (max %.2f× bound), upstream %.3f×", r.name, Quantile(r.res.Completion, .5), Quantile(r.res.Completion, 1),
			r.res.Bound, float64(Quantile(r.res.Completion, 1))/float64(r.res.Bound), float64(r.res.UpstreamBytes)/size)
	}
	if with.UpstreamBytes > size*105/100 {
		t.Errorf("with delegation the upstream sent %.3f× the blob", float64(with.UpstreamBytes)/size)
	}
	// Simulated time: no machine noise. Without delegation every first copy
	// crosses the owner's tenth of an upload (about 12× the bound).
	if Quantile(with.Completion, 1) > Quantile(without.Completion, 1)/3 {
		t.Errorf("with delegation the last node took %v, without %v: want at most a third", Quantile(with.Completion, 1), Quantile(without.Completion, 1))
	}
}

// Every node pulling at once on equal links (the namespace harness's
// scenario a): the upstream is the limit, and the engine keeps within a
// quarter-and-a-bit of it in simulated time. With one upstream reader, the
// owner's upload has no slack to carry the first copies; with readers
// sharing them and their upstream concurrency probed, it has.
func TestAllAtOnceNearBound(t *testing.T) {
	const size = 256 << 20
	for seed := uint64(1); seed <= 3; seed++ {
		cfg := Config{Nodes: 8, Size: size, Up: 25e6, Down: 125e6, OriginUp: 25e6, Latency: time.Millisecond, Seed: seed,
			Selector: collector.SelectorState}
		res := simulate(t, cfg)
		cfg.Readers = 1
		one := simulate(t, cfg)
		ratio := func(r Result) float64 { return float64(Quantile(r.Completion, 1)) / float64(r.Bound) }
		t.Logf("seed %d: max %.2f× bound (%v), one reader %.2f×; the upstream's last byte at %.2f× bound", seed, ratio(res), res.Bound,
			ratio(one), float64(res.OriginBusy)/float64(res.Bound))
		if ratio(res) > 1.3 {
			t.Errorf("seed %d: the last node took %.2f× the bound, want at most 1.3×", seed, ratio(res))
		}
		if res.UpstreamBytes > size*101/100 {
			t.Errorf("seed %d: the upstream sent %.3f× the blob", seed, float64(res.UpstreamBytes)/size)
		}
	}
}
