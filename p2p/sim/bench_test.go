package sim

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"runtime/pprof"
	"sort"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/docker/go-units"

	"github.com/registry-proxy/registry-proxy/internal/report"
	"github.com/registry-proxy/registry-proxy/piece"
)

var (
	simOn        = flag.Bool("sim", false, "TestSimulate: run the large simulations (make bench-sim)")
	simNodes     = flag.String("sim-nodes", "100,1000,2600", "TestSimulate: cluster sizes")
	simSize      = flag.String("sim-size", "3GB", "TestSimulate: blob size")
	simBW        = flag.String("sim-bw", "300MB", "TestSimulate: each node's upload and download, bytes/s")
	simOrigin    = flag.String("sim-origin", "300MB", "TestSimulate: the upstream's upload, bytes/s")
	simLatency   = flag.Duration("sim-latency", time.Millisecond, "TestSimulate: one-way latency between hosts")
	simStep      = flag.Duration("sim-step", 0, "TestSimulate: transfers end on multiples of this (0: exactly; see Config.Step and docs/benchmarks/notebook.md before using it)")
	simModes     = flag.String("sim-modes", "state,fcfs", "TestSimulate: modes (state, fcfs, direct)")
	simScenarios = flag.String("sim-scenarios", "equal,hetero,loaded", "TestSimulate: equal links; hetero (uploads spread ±50%, 10% of nodes at 1/10); loaded (10% of nodes with 4 background uploads)")
	simSeeds     = flag.Int("sim-seeds", 1, "TestSimulate: runs per case (different seeds)")
	simReaders   = flag.Int("sim-readers", 0, "TestSimulate: nodes reading one blob from the upstream (pieces.readers; 0: the node's default)")
	simResults   = flag.String("sim-results", "", "TestSimulate: directory for JSON, Markdown and plots (default results/sim-<time>)")
	simHorizon   = flag.Float64("sim-horizon", 5, "TestSimulate: stop each run at this many times the bound; nodes still pulling count as unfinished")
	simNoSeeding = flag.Bool("sim-no-seeding", false, "TestSimulate: parents send duplicates freely (no super-seeding)")
	simUploadLim = flag.Int("sim-upload-limit", 0, "TestSimulate: each node's concurrent uploads (0: the simulator's default)")
	simMinPiece  = flag.String("sim-min-piece", "0", "TestSimulate: the smallest piece (pieces.min_size; 0: the node's default), also for -sim-validate")
	simConc      = flag.Int("sim-concurrency", 0, "TestSimulate: each node's pieces in flight (pieces.concurrency; 0: the simulator's default)")
	simSync      = flag.Duration("sim-sync-interval", 0, "TestSimulate: how often a parent sends its host state to its children (upload.syncer.interval; 0: the node's default); the meter samples every second")
	simTrace     = flag.Bool("sim-trace", false, "TestSimulate: write the cluster's state every simulated second to trace-<case>.txt in the results directory (pieces held, holders, parents, children, link use, idle uploads and what their children lack, the nodes furthest behind, the upstream's readers, sole holders)")
	simProgress  = flag.Duration("sim-progress", 10*time.Second, "TestSimulate: log the nodes done every this much simulated time")
	simMemLimit  = flag.String("sim-mem-limit", "3.5GiB", "TestSimulate: the Go runtime's soft memory limit for the run (GOMEMLIMIT; 0: none): the collector works harder near it instead of letting garbage grow the heap to twice the live data")
	simHeapProf  = flag.String("sim-heap-profile", "", "TestSimulate: write the heap profile (in use) taken near each run's peak heap to this file")
	simValidate  = flag.String("sim-validate", "", "TestSimulate: instead, simulate the namespace harness's setup (8 nodes, 256 MiB, 25 MB/s, scenarios a, b, d) and compare with the JSON runs in this results directory")
)

// scaleCase is what TestSimulate measured for one case.
type scaleCase struct {
	Nodes    int     `json:"nodes"`
	Scenario string  `json:"scenario"`
	Mode     string  `json:"mode"`
	Seed     uint64  `json:"seed"`
	P50      float64 `json:"p50_over_bound"`
	P99      float64 `json:"p99_over_bound"`
	Max      float64 `json:"max_over_bound"`
	BoundS   float64 `json:"bound_s"`
	EgressX  float64 `json:"egress_over_size"`
	WallS    float64 `json:"wall_s"`
	PeakHeap float64 `json:"peak_heap_mib"`
	PeakLive float64 `json:"peak_live_heap_mib"`
	// Refusals are the refused piece requests per transfer.
	Refusals float64 `json:"refusals_per_transfer"`
	Flows    int64   `json:"flows"`
	// Unfinished nodes were still pulling at the horizon: quantiles they
	// reach are shown as "> horizon".
	Unfinished int     `json:"unfinished"`
	Horizon    float64 `json:"horizon_over_bound"`
}

// q shows a quantile, or "> horizon" where unfinished nodes reach it.
func (c scaleCase) q(q, v float64) string {
	if float64(c.Unfinished) > (1-q)*float64(c.Nodes)+1e-9 {
		return fmt.Sprintf("> %g", c.Horizon)
	}
	return fmt.Sprintf("%.2f", v)
}

// boundOf is the Kumar–Ross bound of cfg's nominal capacities.
func boundOf(cfg Config) time.Duration {
	ups := make([]float64, cfg.Nodes)
	downs := make([]float64, cfg.Nodes)
	for i := range ups {
		ups[i], downs[i] = cfg.Up, cfg.Down
	}
	return Bound(cfg.Size, cfg.OriginUp, ups, downs)
}

func scenarioConfig(name string, n int, cfg *Config) {
	switch name {
	case "equal":
	case "hetero":
		cfg.Spread, cfg.Throttled = 0.5, n/10
	case "loaded":
		cfg.Loaded, cfg.LoadFlows = n/10, 4
	}
}

// peakHeap samples the heap every 20 ms until stop, outside the bubble:
// the peak of the heap's objects (live and not yet collected: what the
// process holds) and of the live heap (what the last GC found in use).
// With -sim-heap-profile it writes a heap profile each time the live heap
// grew by a tenth, so the last one is near the peak.
func peakHeap(stop <-chan struct{}) func() (objects, live float64) {
	var peak, peakLive uint64
	sample := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}, {Name: "/gc/heap/live:bytes"}}
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(20 * time.Millisecond)
		defer t.Stop()
		for {
			metrics.Read(sample)
			l := sample[1].Value.Uint64()
			if *simHeapProf != "" && l > peakLive+peakLive/10 {
				writeHeapProfile(*simHeapProf)
			}
			peak, peakLive = max(peak, sample[0].Value.Uint64()), max(peakLive, l)
			select {
			case <-stop:
				return
			case <-t.C:
			}
		}
	}()
	return func() (float64, float64) {
		<-done
		return float64(peak) / (1 << 20), float64(peakLive) / (1 << 20)
	}
}

// writeHeapProfile writes the in-use heap profile to path, replacing it.
func writeHeapProfile(path string) {
	f, err := os.Create(path)
	if err != nil {
		return
	}
	defer f.Close()
	_ = pprof.Lookup("heap").WriteTo(f, 0)
}

// minPiece is -sim-min-piece in bytes.
func minPiece(t *testing.T) int64 {
	n, err := units.RAMInBytes(*simMinPiece)
	if err != nil {
		t.Fatalf("-sim-min-piece: %v", err)
	}
	if n != 0 {
		if err := piece.ValidMin(n); err != nil {
			t.Fatalf("-sim-min-piece: %v", err)
		}
	}
	return n
}

func toRun(scenario string, repeat int, cfg Config, res Result) report.Run {
	r := report.Run{Scenario: scenario, Mode: cfg.Selector, Repeat: repeat, Nodes: cfg.Nodes, Size: cfg.Size,
		NodeBps: int64(cfg.Up), OriginBps: int64(cfg.OriginUp), Seconds: map[string]float64{},
		Bound: res.Bound.Seconds(), Egress: res.UpstreamBytes,
		BySource: map[string]int64{"upstream": res.UpstreamBytes, "peer": int64(cfg.Nodes)*cfg.Size - res.UpstreamBytes}}
	if cfg.Selector == Direct {
		r.BySource = map[string]int64{"upstream": res.UpstreamBytes}
	}
	for k, c := range res.Completion {
		if c < 0 {
			c = cfg.Horizon // censored: still pulling then
		}
		r.Seconds[nodeID(k)] = c.Seconds()
	}
	r.Finish()
	return r
}

func resultsDir(t *testing.T, flagDir, prefix string) string {
	dir := flagDir
	if dir == "" {
		dir = filepath.Join("..", "..", "results", prefix+"-"+time.Now().UTC().Format("20060102-150405"))
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// TestSimulate runs the simulator at scale (make bench-sim) and reports
// completion ÷ bound for each mode, and the simulator's own run time and
// memory as the cluster grows.
func TestSimulate(t *testing.T) {
	if !*simOn {
		t.Skip("large simulations run with -sim (make bench-sim)")
	}
	if *simValidate != "" {
		validate(t, *simValidate)
		return
	}
	size, err := units.FromHumanSize(*simSize)
	if err != nil {
		t.Fatal(err)
	}
	bw, err := units.FromHumanSize(*simBW)
	if err != nil {
		t.Fatal(err)
	}
	origin, err := units.FromHumanSize(*simOrigin)
	if err != nil {
		t.Fatal(err)
	}
	if *simMemLimit != "0" {
		limit, err := units.RAMInBytes(*simMemLimit)
		if err != nil {
			t.Fatalf("-sim-mem-limit: %v", err)
		}
		defer debug.SetMemoryLimit(debug.SetMemoryLimit(limit))
	}
	dir := resultsDir(t, *simResults, "sim")
	var cases []scaleCase
	var runs []report.Run
	for _, ns := range strings.Split(*simNodes, ",") {
		var n int
		fmt.Sscan(ns, &n)
		for _, sc := range strings.Split(*simScenarios, ",") {
			for _, mode := range strings.Split(*simModes, ",") {
				for seed := range uint64(*simSeeds) {
					cfg := Config{Nodes: n, Size: size, Up: float64(bw), Down: float64(bw), OriginUp: float64(origin),
						Latency: *simLatency, Step: *simStep, Selector: mode, Seed: seed + 1, Readers: *simReaders, NoSeeding: *simNoSeeding, UploadLimit: *simUploadLim, Concurrency: *simConc, SyncInterval: *simSync, MinPiece: minPiece(t)}
					scenarioConfig(sc, n, &cfg)
					cfg.Horizon = time.Duration(*simHorizon * float64(boundOf(cfg)))
					// Inside the bubble time.Now is the simulated clock: progress
					// is reported in simulated time only.
					cfg.Progress = func(at time.Duration, done int) {
						if at%*simProgress == 0 {
							t.Logf("  %d nodes %s %s: simulated %v, %d done", n, sc, mode, at.Round(time.Second), done)
						}
					}
					if *simTrace {
						f, err := os.Create(filepath.Join(dir, fmt.Sprintf("trace-%s-n%d-%s-%d.txt", sc, n, mode, seed+1)))
						if err != nil {
							t.Fatal(err)
						}
						defer f.Close()
						cfg.Trace = f
					}
					runtime.GC()
					stop := make(chan struct{})
					peak := peakHeap(stop)
					start := time.Now()
					res := simulate(t, cfg)
					wall := time.Since(start)
					close(stop)
					heap, live := peak()
					r := toRun(fmt.Sprintf("%s-n%d", sc, n), int(seed), cfg, res)
					runs = append(runs, r)
					if err := report.WriteJSON(dir, r); err != nil {
						t.Error(err)
					}
					c := scaleCase{Nodes: n, Scenario: sc, Mode: mode, Seed: seed + 1, P50: r.P50 / r.Bound, P99: r.P99 / r.Bound,
						Max: r.Max / r.Bound, BoundS: r.Bound, EgressX: r.EgressX, WallS: wall.Seconds(), PeakHeap: heap, PeakLive: live, Flows: res.Flows, Refusals: float64(res.Refused) / float64(max(res.Flows, 1)),
						Unfinished: res.Unfinished, Horizon: *simHorizon}
					cases = append(cases, c)
					t.Logf("%5d nodes %-6s %-6s: p50 %s p99 %s max %s × bound %.1fs | egress %.3f×, upstream's last byte at %.2f× bound | sim %.1fs wall, peak heap %.0f MiB (live %.0f), %d flows, %.1f refusals a transfer (%.0f%% busy), %d unfinished at %g× bound",
						n, sc, mode, c.q(.5, c.P50), c.q(.99, c.P99), c.q(1, c.Max), c.BoundS, c.EgressX, float64(res.OriginBusy)/float64(res.Bound), c.WallS, c.PeakHeap, c.PeakLive, c.Flows, c.Refusals, 100*float64(res.RefusedBusy)/float64(max(res.Refused, 1)), c.Unfinished, c.Horizon)
				}
			}
		}
	}
	md := scaleSummary(cases, size, bw, origin)
	js, _ := json.MarshalIndent(cases, "", "  ")
	os.WriteFile(filepath.Join(dir, "scale.json"), js, 0o644)
	os.WriteFile(filepath.Join(dir, "summary.md"), []byte(md), 0o644)
	if _, err := report.Plots(dir, runs); err != nil {
		t.Error(err)
	}
	t.Logf("results in %s\n%s", dir, md)
}

func scaleSummary(cases []scaleCase, size, bw, origin int64) string {
	var sb strings.Builder
	fmt.Fprintf(&sb, "Blob %s, every node %s/s up and down, upstream %s/s, latency %v. Medians over seeds.\n\n",
		units.HumanSize(float64(size)), units.HumanSize(float64(bw)), units.HumanSize(float64(origin)), *simLatency)
	sb.WriteString("| nodes | scenario | mode | p50 ÷ bound | p99 ÷ bound | max ÷ bound | bound s | upstream egress ÷ blob | sim wall s | sim peak heap MiB | sim peak live heap MiB | flows |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	type key struct {
		n        int
		sc, mode string
	}
	var keys []key
	by := map[key][]scaleCase{}
	for _, c := range cases {
		k := key{c.Nodes, c.Scenario, c.Mode}
		if _, ok := by[k]; !ok {
			keys = append(keys, k)
		}
		by[k] = append(by[k], c)
	}
	med := func(cs []scaleCase, f func(scaleCase) float64) float64 {
		v := make([]float64, len(cs))
		for i, c := range cs {
			v[i] = f(c)
		}
		sort.Float64s(v)
		return v[len(v)/2]
	}
	for _, k := range keys {
		cs := by[k]
		mc := cs[0] // quantiles shown as "> horizon" by the first seed's unfinished count
		fmt.Fprintf(&sb, "| %d | %s | %s | %s | %s | %s | %.1f | %.3f | %.1f | %.0f | %.0f | %d |\n", k.n, k.sc, k.mode,
			mc.q(.5, med(cs, func(c scaleCase) float64 { return c.P50 })), mc.q(.99, med(cs, func(c scaleCase) float64 { return c.P99 })),
			mc.q(1, med(cs, func(c scaleCase) float64 { return c.Max })), med(cs, func(c scaleCase) float64 { return c.BoundS }),
			med(cs, func(c scaleCase) float64 { return c.EgressX }), med(cs, func(c scaleCase) float64 { return c.WallS }),
			med(cs, func(c scaleCase) float64 { return c.PeakHeap }), med(cs, func(c scaleCase) float64 { return c.PeakLive }), int64(med(cs, func(c scaleCase) float64 { return float64(c.Flows) })))
	}
	return sb.String()
}

// validate runs the harness's setup in the simulator and compares medians
// with the harness's JSON runs in dir.
func validate(t *testing.T, dir string) {
	files, _ := filepath.Glob(filepath.Join(dir, "*.json"))
	var real []report.Run
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var r report.Run
		if json.Unmarshal(b, &r) == nil && r.Scenario != "" && r.Mode != "" {
			real = append(real, r)
		}
	}
	if len(real) == 0 {
		t.Fatalf("no harness runs (JSON) in %s", dir)
	}
	var sb strings.Builder
	sb.WriteString("| scenario | mode | harness p50 s | sim p50 s | harness max s | sim max s | sim ÷ harness (max) |\n|---|---|---|---|---|---|---|\n")
	_, modes, by := report.Group(real)
	for _, sc := range []string{"a", "b", "d"} {
		for _, mode := range modes[sc] {
			rs := by[[2]string{sc, mode}]
			if len(rs) == 0 {
				continue
			}
			h := rs[0]
			var sims []report.Run
			for seed := range uint64(5) {
				cfg := Config{Nodes: h.Nodes, Size: h.Size, Up: float64(h.NodeBps), Down: float64(h.NodeBps), OriginUp: float64(h.OriginBps),
					Latency: 200 * time.Microsecond, Selector: mode, Seed: seed + 1, MinPiece: minPiece(t)}
				switch sc {
				case "b":
					// The harness's default: two parents throttled to a tenth.
					if strings.Contains(h.Note, "loaded") {
						cfg.Loaded, cfg.LoadFlows = 2, 4
					} else {
						cfg.Throttled = 2
					}
				case "d":
					cfg.Waves, cfg.WaveGap = 3, 4*time.Second
				}
				sims = append(sims, toRun(sc, int(seed), cfg, simulate(t, cfg)))
			}
			hp50, hmax := report.Median(rs, func(r report.Run) float64 { return r.P50 }), report.Median(rs, func(r report.Run) float64 { return r.Max })
			sp50, smax := report.Median(sims, func(r report.Run) float64 { return r.P50 }), report.Median(sims, func(r report.Run) float64 { return r.Max })
			fmt.Fprintf(&sb, "| %s | %s | %.2f | %.2f | %.2f | %.2f | %.2f |\n", sc, mode, hp50, sp50, hmax, smax, smax/math.Max(hmax, 1e-9))
		}
	}
	t.Logf("simulator vs namespace harness (%s), medians; sim over 5 seeds:\n%s", dir, sb.String())
	os.WriteFile(filepath.Join(dir, "sim-validation.md"), []byte(sb.String()), 0o644)
}

// simulate runs cfg in a fresh synctest bubble.
func simulate(t *testing.T, cfg Config) Result {
	t.Helper()
	var res Result
	var err error
	synctest.Test(t, func(t *testing.T) {
		res, err = Run(context.Background(), cfg)
	})
	if err != nil {
		t.Fatalf("%+v: %v", cfg, err)
	}
	return res
}
