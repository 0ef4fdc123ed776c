// Package report turns cluster pulls (from the namespace harness or the
// simulator) into the figures the benchmarks print: medians per scenario and
// mode, a Markdown summary, JSON per run, and plots (completion-time CDF per
// mode, bytes by source) as SVG and PNG.
package report

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"

	"github.com/docker/go-units"
)

// Run is one pull of one blob by every node, in one mode.
type Run struct {
	Scenario  string             `json:"scenario"`
	Mode      string             `json:"mode"` // state, fcfs, direct
	Repeat    int                `json:"repeat"`
	Nodes     int                `json:"nodes"`
	Size      int64              `json:"size"`
	NodeBps   int64              `json:"node_bps"`
	OriginBps int64              `json:"origin_bps"`
	Note      string             `json:"note,omitempty"` // what makes the scenario (throttled nodes, waves, ...)
	Seconds   map[string]float64 `json:"seconds"`        // per node, from its own start
	P50       float64            `json:"p50"`
	P95       float64            `json:"p95"`
	P99       float64            `json:"p99"`
	Max       float64            `json:"max"`
	Bound     float64            `json:"bound"` // Kumar–Ross
	MaxOver   float64            `json:"max_over_bound"`
	Egress    int64              `json:"upstream_egress"`
	EgressX   float64            `json:"egress_over_size"`
	BySource  map[string]int64   `json:"bytes_by_source"`  // upstream, peer; summed over nodes
	ByParent  map[string]int64   `json:"bytes_by_parent"`  // summed over nodes
	Pieces    map[string]int     `json:"pieces_by_parent"` // piece-level parent choices
	PieceSize int64              `json:"piece_size,omitempty"`
	// CPUBusy is the machine's CPU use while the nodes pulled, 0..1 (all
	// processes of the run share the machine's cores).
	CPUBusy float64 `json:"cpu_busy,omitempty"`
	// ProxyCPU and ContainerdCPU are the CPU-seconds (user and system)
	// the proxies and the containerd daemons used while the nodes pulled,
	// summed over nodes, from each process's own accounting.
	ProxyCPU      float64 `json:"proxy_cpu_seconds,omitempty"`
	ContainerdCPU float64 `json:"containerd_cpu_seconds,omitempty"`
	// UpstreamDone is when the upstream last wrote blob bytes, seconds from
	// the start (0: unknown). Past the bound, the origin's link idled or ran
	// below its rate; the nodes' time after it is the peers' tail.
	UpstreamDone float64 `json:"upstream_done,omitempty"`
	// ProxiesDone is when the last node's proxy had every blob verified,
	// seconds from the start (0: unknown, or no proxies). The clients'
	// time after it is their own: reading the last bytes, containerd's
	// unpacking.
	ProxiesDone float64 `json:"proxies_done,omitempty"`
}

// Finish computes the quantiles and ratios from Seconds, Bound, Egress and Size.
func (r *Run) Finish() {
	var secs []float64
	for _, s := range r.Seconds {
		secs = append(secs, s)
	}
	sort.Float64s(secs)
	r.P50, r.P95, r.P99 = Quantile(secs, .5), Quantile(secs, .95), Quantile(secs, .99)
	if len(secs) > 0 {
		r.Max = secs[len(secs)-1]
	}
	if r.Bound > 0 {
		r.MaxOver = r.Max / r.Bound
	}
	if r.Size > 0 {
		r.EgressX = float64(r.Egress) / float64(r.Size)
	}
	if r.PieceSize > 0 && r.ByParent != nil {
		r.Pieces = map[string]int{}
		for p, b := range r.ByParent {
			r.Pieces[p] = int(math.Round(float64(b) / float64(r.PieceSize)))
		}
	}
}

// Quantile of sorted values, nearest rank.
func Quantile(sorted []float64, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	k := int(math.Ceil(q*float64(len(sorted)))) - 1
	return sorted[max(0, min(k, len(sorted)-1))]
}

// KumarRoss is the lower bound, in seconds, on the time for every node to
// hold a file of f bytes from an origin uploading uo, the nodes uploading
// ups and downloading downs (bytes/s): max(f/uo, f/min(downs), N·f/(uo+Σups)).
func KumarRoss(f, uo float64, ups, downs []float64) float64 {
	sum, dmin := uo, math.Inf(1)
	for _, u := range ups {
		sum += u
	}
	for _, d := range downs {
		dmin = min(dmin, d)
	}
	return max(f/uo, f/dmin, float64(len(ups))*f/sum)
}

// WriteJSON writes r to dir/<scenario>-<mode>-<repeat>.json.
func WriteJSON(dir string, r Run) error {
	js, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, fmt.Sprintf("%s-%s-%d.json", r.Scenario, r.Mode, r.Repeat)), js, 0o644)
}

// Median of f over runs.
func Median(runs []Run, f func(Run) float64) float64 {
	v := make([]float64, 0, len(runs))
	for _, r := range runs {
		v = append(v, f(r))
	}
	return MedianOf(v)
}

// MedianOf is the median of v (0 for none); v is left as it was.
func MedianOf(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	return medianOf(s)
}

// Group splits runs by scenario then mode, each in first-seen order.
func Group(runs []Run) (scenarios []string, modes map[string][]string, by map[[2]string][]Run) {
	modes = map[string][]string{}
	by = map[[2]string][]Run{}
	for _, r := range runs {
		k := [2]string{r.Scenario, r.Mode}
		if _, ok := modes[r.Scenario]; !ok {
			scenarios = append(scenarios, r.Scenario)
		}
		if _, ok := by[k]; !ok {
			modes[r.Scenario] = append(modes[r.Scenario], r.Mode)
		}
		by[k] = append(by[k], r)
	}
	return scenarios, modes, by
}

// Summary is a Markdown table of medians per scenario and mode, with the
// ratios between modes that the benchmark's targets are stated in.
func Summary(runs []Run) string {
	scenarios, modes, by := Group(runs)
	var sb strings.Builder
	for _, sc := range scenarios {
		first := by[[2]string{sc, modes[sc][0]}][0]
		fmt.Fprintf(&sb, "### Scenario %s: %d nodes, %s blob, links %s/s, origin %s/s", sc, first.Nodes, units.BytesSize(float64(first.Size)),
			units.HumanSize(float64(first.NodeBps)), units.HumanSize(float64(first.OriginBps)))
		if first.Note != "" {
			fmt.Fprintf(&sb, "; %s", first.Note)
		}
		sb.WriteString("\n\nMedians over runs.\n\n| mode | runs | p50 s | p95 s | p99 s | max s | bound s | max/bound | upstream done/bound | proxies done/bound | upstream egress / blob | peer bytes share | CPU busy |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
		for _, m := range modes[sc] {
			rs := by[[2]string{sc, m}]
			fmt.Fprintf(&sb, "| %s | %d | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.3f | %.1f%% | %.0f%% |\n", m, len(rs),
				Median(rs, func(r Run) float64 { return r.P50 }), Median(rs, func(r Run) float64 { return r.P95 }),
				Median(rs, func(r Run) float64 { return r.P99 }), Median(rs, func(r Run) float64 { return r.Max }),
				Median(rs, func(r Run) float64 { return r.Bound }), Median(rs, func(r Run) float64 { return r.MaxOver }),
				Median(rs, func(r Run) float64 { return r.UpstreamDone / r.Bound }),
				Median(rs, func(r Run) float64 { return r.ProxiesDone / r.Bound }),
				Median(rs, func(r Run) float64 { return r.EgressX }), 100*Median(rs, peerShare),
				100*Median(rs, func(r Run) float64 { return r.CPUBusy }))
		}
		ratio := func(a, b string, f func(Run) float64, what string) {
			ra, rb := by[[2]string{sc, a}], by[[2]string{sc, b}]
			if len(ra) == 0 || len(rb) == 0 {
				return
			}
			// Ratios within each repeat (same run of the harness), then the median.
			var v []float64
			for _, x := range ra {
				for _, y := range rb {
					if x.Repeat == y.Repeat && f(x) > 0 {
						v = append(v, f(y)/f(x))
					}
				}
			}
			if len(v) == 0 {
				return
			}
			sort.Float64s(v)
			fmt.Fprintf(&sb, "- %s ÷ %s, %s: median %.2f× (runs: %s)\n", b, a, what, medianOf(v), floats(v))
		}
		sb.WriteString("\n")
		p99 := func(r Run) float64 { return r.P99 }
		mx := func(r Run) float64 { return r.Max }
		ratio("state", "fcfs", p99, "p99")
		ratio("state", "direct", mx, "max")
		ratio("fcfs", "direct", mx, "max")
		sb.WriteString("\n")
	}
	return sb.String()
}

func peerShare(r Run) float64 {
	var all int64
	for _, b := range r.BySource {
		all += b
	}
	if all == 0 {
		return 0
	}
	return float64(r.BySource["peer"]) / float64(all)
}

func medianOf(sorted []float64) float64 {
	if len(sorted)%2 == 1 {
		return sorted[len(sorted)/2]
	}
	return (sorted[len(sorted)/2-1] + sorted[len(sorted)/2]) / 2
}

func floats(v []float64) string {
	s := make([]string, len(v))
	for i, x := range v {
		s[i] = fmt.Sprintf("%.2f", x)
	}
	return strings.Join(s, ", ")
}
