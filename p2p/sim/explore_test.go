package sim

import (
	"fmt"
	"os"
	"sort"
	"testing"
	"time"
)

func TestExplore(t *testing.T) {
	if os.Getenv("EXPLORE") == "" {
		t.Skip()
	}
	variants := map[string]func(*Config){
		"a":          func(c *Config) {},
		"b-throttle": func(c *Config) { c.Throttled = 2 },
		"d-waves":    func(c *Config) { c.Waves = 3; c.WaveGap = 4 * time.Second },
	}
	names := []string{}
	for k := range variants {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, size := range []int64{256 << 20} {
		for _, sel := range []string{"state", "fcfs"} {
			for _, name := range names {
				var ratios, ups []float64
				for seed := range uint64(5) {
					cfg := Config{Nodes: 8, Size: size, Up: 25e6, Down: 25e6, OriginUp: 25e6, Latency: time.Millisecond, Seed: seed, Selector: sel}
					variants[name](&cfg)
					res := simulate(t, cfg)
					ratios = append(ratios, Quantile(res.Completion, 1).Seconds()/res.Bound.Seconds())
					ups = append(ups, float64(res.UpstreamBytes)/float64(size))
				}
				sort.Float64s(ratios)
				fmt.Printf("%4dMiB %-5s %-8s max/bound median %.2f [%.2f..%.2f] upstream %.2f\n", size>>20, sel, name, ratios[2], ratios[0], ratios[4], ups)
			}
		}
	}
}
