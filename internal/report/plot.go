package report

import (
	"fmt"
	"image/color"
	"path/filepath"
	"sort"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
)

// Plots writes, for each scenario, <dir>/<scenario>-cdf.{svg,png} (share of
// nodes done by time, every run of a mode pooled, the bound as a line) and
// <dir>/<scenario>-sources.{svg,png} (median bytes per node from the
// upstream and from peers, per mode). It returns the files written.
func Plots(dir string, runs []Run) ([]string, error) {
	scenarios, modes, by := Group(runs)
	var files []string
	for _, sc := range scenarios {
		cdf := plot.New()
		cdf.Title.Text = fmt.Sprintf("Scenario %s: completion time CDF", sc)
		cdf.X.Label.Text = "seconds since the node's pull started"
		cdf.Y.Label.Text = "share of nodes done"
		cdf.Legend.Top = false
		cdf.Legend.Left = false
		var lines []any
		var bound float64
		for _, m := range modes[sc] {
			var secs []float64
			for _, r := range by[[2]string{sc, m}] {
				bound = r.Bound
				for _, s := range r.Seconds {
					secs = append(secs, s)
				}
			}
			sort.Float64s(secs)
			pts := make(plotter.XYs, 0, 2*len(secs)+1)
			pts = append(pts, plotter.XY{X: 0, Y: 0})
			for i, s := range secs {
				pts = append(pts, plotter.XY{X: s, Y: float64(i) / float64(len(secs))}, plotter.XY{X: s, Y: float64(i+1) / float64(len(secs))})
			}
			lines = append(lines, m, pts)
		}
		if err := plotutil.AddLines(cdf, lines...); err != nil {
			return files, fmt.Errorf("report: cdf: %w", err)
		}
		if bound > 0 {
			b, err := plotter.NewLine(plotter.XYs{{X: bound, Y: 0}, {X: bound, Y: 1}})
			if err != nil {
				return files, err
			}
			b.Color = color.Gray{Y: 128}
			b.Dashes = []vg.Length{vg.Points(4), vg.Points(3)}
			cdf.Add(b)
			cdf.Legend.Add("bound", b)
		}
		f, err := save(cdf, dir, sc+"-cdf")
		files = append(files, f...)
		if err != nil {
			return files, err
		}

		bars := plot.New()
		bars.Title.Text = fmt.Sprintf("Scenario %s: bytes per node by source (median run)", sc)
		bars.Y.Label.Text = "MiB per node"
		var up, peer plotter.Values
		for _, m := range modes[sc] {
			rs := by[[2]string{sc, m}]
			n := float64(max(rs[0].Nodes, 1))
			up = append(up, Median(rs, func(r Run) float64 { return float64(r.BySource["upstream"]) / n / (1 << 20) }))
			peer = append(peer, Median(rs, func(r Run) float64 { return float64(r.BySource["peer"]) / n / (1 << 20) }))
		}
		w := vg.Points(40)
		bu, err := plotter.NewBarChart(up, w)
		if err != nil {
			return files, err
		}
		bu.Color = plotutil.Color(0)
		bp, err := plotter.NewBarChart(peer, w)
		if err != nil {
			return files, err
		}
		bp.Color = plotutil.Color(1)
		bp.StackOn(bu)
		bars.Add(bu, bp)
		bars.Legend.Add("upstream", bu)
		bars.Legend.Add("peers", bp)
		bars.Legend.Top = true
		bars.Legend.Left = true
		bars.NominalX(modes[sc]...)
		// Room at the sides for the outer bars and on top for the legend.
		bars.X.Min, bars.X.Max = -0.6, float64(len(modes[sc]))-0.4
		bars.Y.Min = 0
		bars.Y.Max *= 1.3
		f, err = save(bars, dir, sc+"-sources")
		files = append(files, f...)
		if err != nil {
			return files, err
		}
	}
	return files, nil
}

func save(p *plot.Plot, dir, name string) ([]string, error) {
	var out []string
	for _, ext := range []string{".svg", ".png"} {
		path := filepath.Join(dir, name+ext)
		if err := p.Save(6*vg.Inch, 4*vg.Inch, path); err != nil {
			return out, fmt.Errorf("report: %s: %w", path, err)
		}
		out = append(out, path)
	}
	return out, nil
}
