package benchplot

import (
	"fmt"
	"image/color"
	"math"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
)

// The files Write draws, and the size of each (at the PNG canvas's 96 dpi,
// 960 × 540 pixels).
const (
	FileSingle  = "single-node.png"
	FileCluster = "cluster.png"
	FileSim     = "simulator.png"
	width       = 10 * vg.Inch
	height      = 5.625 * vg.Inch
)

// Write draws the plots into dir, each from the figures of its plot, and
// returns the files written. A plot without figures is not drawn.
func Write(dir string, figs []Figure) ([]string, error) {
	byPlot := map[string][]Figure{}
	for _, f := range figs {
		byPlot[f.Plot] = append(byPlot[f.Plot], f)
	}
	var files []string
	for _, d := range []struct {
		plot, file string
		draw       func([]Figure) (*plot.Plot, error)
	}{
		{PlotSingle, FileSingle, singlePlot},
		{PlotCluster, FileCluster, clusterPlot},
		{PlotSim, FileSim, simPlot},
	} {
		if len(byPlot[d.plot]) == 0 {
			continue
		}
		p, err := d.draw(byPlot[d.plot])
		if err != nil {
			return files, fmt.Errorf("benchplot: %s: %w", d.plot, err)
		}
		path := filepath.Join(dir, d.file)
		if err := p.Save(width, height, path); err != nil {
			return files, fmt.Errorf("benchplot: %w", err)
		}
		files = append(files, path)
	}
	return files, nil
}

// The plots' colours (a palette that reads in grey and to most colour-blind
// eyes) and the series' glyphs, in the order the series appear.
var (
	boundColor = color.Gray{Y: 90}
	blue       = color.RGBA{R: 0, G: 114, B: 178, A: 255}
	orange     = color.RGBA{R: 230, G: 159, B: 0, A: 255}
	grey       = color.RGBA{R: 120, G: 120, B: 120, A: 255}
	green      = color.RGBA{R: 0, G: 158, B: 115, A: 255}
	purple     = color.RGBA{R: 204, G: 121, B: 167, A: 255}
	red        = color.RGBA{R: 200, G: 30, B: 30, A: 255}
)

func shapes() []draw.GlyphDrawer {
	return []draw.GlyphDrawer{draw.CircleGlyph{}, draw.BoxGlyph{}, draw.PyramidGlyph{}, draw.RingGlyph{}}
}

// kraken is the simulator plot's series of Kraken's published figures.
const kraken = "Kraken, published"

// singlePlot: one node's throughput ÷ a direct download's, per figure, on a
// log axis with direct at 1.
func singlePlot(figs []Figure) (*plot.Plot, error) {
	p := newPlot("One node, 1 GiB blob: throughput through registry-proxy ÷ a direct download's",
		howToRead, "throughput ÷ direct download's (log scale)")
	names := categories(figs, func(f Figure) string { return f.X })
	p.NominalX(names...)
	p.Y.Tick.Marker = ticks([]float64{0.1, 0.2, 0.5, 1, 2, 5, 10}, log10)
	p.X.Min, p.X.Max = -0.5, float64(len(names))-0.5
	p.Y.Min, p.Y.Max = log10(0.1), log10(10)
	if err := hline(p, log10(1), "a direct download from the same upstream (= 1)"); err != nil {
		return nil, err
	}
	idx, latest := index(names), newest(figs)
	for _, f := range figs {
		if err := mark(p, float64(idx[f.X]), f, log10, blue, draw.CircleGlyph{}, dated(f, latest)); err != nil {
			return nil, err
		}
	}
	p.Legend.Left = true // bottom left, under the paced bar
	p.Legend.XOffs = vg.Points(12)
	p.Legend.YOffs = vg.Points(8)
	return p, nil
}

// howToRead explains the marks, under each plot's x axis.
const howToRead = "bar: the runs' range; dot on a bar: their median (dots at both ends: none stated); date: an older run"

// clusterPlot: the namespace harness's slowest node ÷ the lower bound, per
// scenario and mode, on a log axis with the bound at 1.
func clusterPlot(figs []Figure) (*plot.Plot, error) {
	p := newPlot("8 nodes, 256 MiB, 25 MB/s links: the slowest node's time ÷ the lower bound",
		"scenario\n"+howToRead, "slowest node ÷ lower bound (log scale)")
	names := categories(figs, func(f Figure) string { return f.X })
	series := categories(figs, func(f Figure) string { return f.Series })
	p.NominalX(names...)
	p.Y.Tick.Marker = ticks([]float64{1, 1.25, 1.5, 2, 3, 5, 8, 10}, log10)
	p.X.Min, p.X.Max = -0.5, float64(len(names))-0.5
	p.Y.Min, p.Y.Max = log10(0.9), log10(14)
	if err := hline(p, log10(1), "lower bound (Kumar–Ross)"); err != nil {
		return nil, err
	}
	colors, shapes := []color.Color{blue, orange, grey, green, purple}, shapes()
	idx, sIdx, latest := index(names), index(series), newest(figs)
	const spread = 0.27 // x distance between the modes of one scenario
	for i, s := range series {
		legend(p, s, colors[i%len(colors)], shapes[i%len(shapes)])
	}
	for _, f := range figs {
		i := sIdx[f.Series]
		x := float64(idx[f.X]) + spread*(float64(i)-float64(len(series)-1)/2)
		if err := mark(p, x, f, log10, colors[i%len(colors)], shapes[i%len(shapes)], dated(f, latest)); err != nil {
			return nil, err
		}
	}
	p.Legend.Top = true
	p.Legend.Left = true
	p.Legend.XOffs = vg.Points(12)
	return p, nil
}

// simPlot: the simulator's p50 and p99 ÷ the lower bound against the node
// count (log), each case a colour, p50 a ring and p99 a disc; Kraken's
// published figures in red.
func simPlot(figs []Figure) (*plot.Plot, error) {
	p := newPlot("Simulator, one blob, 300 MB/s links: p50 and p99 completion ÷ the lower bound",
		"nodes (log scale)\n"+howToRead, "completion time ÷ lower bound")
	p.X.Min, p.X.Max = log10(200), log10(4500)
	p.Y.Min, p.Y.Max = 0.9, 2.0
	var xt []float64
	for _, n := range categories(figs, func(f Figure) string { return f.X }) {
		v, _ := strconv.ParseFloat(n, 64)
		xt = append(xt, v)
	}
	p.X.Tick.Marker = ticks(xt, log10)
	p.Y.Tick.Marker = ticks([]float64{0.9, 1, 1.2, 1.4, 1.6, 1.8, 2}, linear)
	if err := hline(p, 1, "lower bound"); err != nil {
		return nil, err
	}
	series := categories(figs, func(f Figure) string { return f.Series })
	stats := categories(figs, func(f Figure) string { return f.Stat })
	stIdx, latest := index(stats), newest(figs)
	palette := []color.Color{blue, green, purple, grey, orange}
	colors := map[string]color.Color{}
	for i, s := range series {
		colors[s] = palette[i%len(palette)]
		if s == kraken {
			colors[s] = red
		}
		legend(p, s, colors[s], draw.CircleGlyph{})
	}
	statShapes := []draw.GlyphDrawer{draw.RingGlyph{}, draw.CircleGlyph{}, draw.BoxGlyph{}}
	for i, st := range stats {
		legend(p, st, color.Black, statShapes[i%len(statShapes)])
	}
	// The cases at one node count sit side by side, not on each other.
	at := map[string][]string{}
	for _, f := range figs {
		if !slices.Contains(at[f.X], f.Series) {
			at[f.X] = append(at[f.X], f.Series)
		}
	}
	for _, f := range figs {
		here := at[f.X]
		x := log10(f.Nodes()) + 0.08*(float64(slices.Index(here, f.Series))-float64(len(here)-1)/2)
		label := ""
		if strings.HasPrefix(f.Stat, "p99") { // labelling the p50s too would crowd them
			label = dated(f, latest)
		}
		if err := mark(p, x, f, linear, colors[f.Series], statShapes[stIdx[f.Stat]%len(statShapes)], label); err != nil {
			return nil, err
		}
	}
	p.Legend.Top = true
	p.Legend.Left = true
	p.Legend.XOffs = vg.Points(12)
	return p, nil
}

// dated is a figure's label, with its date where it is older than the
// plot's newest figure.
func dated(f Figure, latest string) string {
	if f.Date != "" && f.Date < latest {
		return f.Label() + " (" + f.Date + ")"
	}
	return f.Label()
}

// newest is the latest date among figs (dates are YYYY-MM-DD).
func newest(figs []Figure) string {
	var d string
	for _, f := range figs {
		d = max(d, f.Date)
	}
	return d
}

func newPlot(title, x, y string) *plot.Plot {
	p := plot.New()
	p.Title.Text = title
	p.Title.Padding = vg.Points(6)
	p.X.Label.Text = x
	p.Y.Label.Text = y
	g := plotter.NewGrid()
	g.Vertical.Width = 0
	p.Add(g)
	return p
}

// mark draws a figure at x, its values placed on the y axis by ty: a value
// as a glyph, with its range as a whisker around it; a range without a value
// as a glyph at each end joined by a line (no point between them is a
// figure). The label goes to the right.
func mark(p *plot.Plot, x float64, f Figure, ty func(float64) float64, c color.Color, shape draw.GlyphDrawer, label string) error {
	glyph := draw.GlyphStyle{Color: c, Radius: vg.Points(4), Shape: shape}
	value, low, high := ty(f.ValueNum), ty(f.LowNum), ty(f.HighNum)
	y := value
	var points plotter.XYs
	if f.HasRange() {
		w, err := plotter.NewLine(plotter.XYs{{X: x, Y: low}, {X: x, Y: high}})
		if err != nil {
			return err
		}
		w.Color, w.Width = c, vg.Points(2)
		p.Add(w)
		ends := plotter.XYs{{X: x, Y: low}, {X: x, Y: high}}
		if f.HasValue() {
			caps, err := plotter.NewScatter(ends)
			if err != nil {
				return err
			}
			caps.GlyphStyle = draw.GlyphStyle{Color: c, Radius: vg.Points(5), Shape: capGlyph{}}
			p.Add(caps)
		} else {
			points = ends
			y = (low + high) / 2 // where the label goes
		}
	}
	if f.HasValue() {
		points = plotter.XYs{{X: x, Y: value}}
	}
	s, err := plotter.NewScatter(points)
	if err != nil {
		return err
	}
	s.GlyphStyle = glyph
	p.Add(s)
	if label == "" {
		return nil
	}
	l, err := plotter.NewLabels(plotter.XYLabels{XYs: plotter.XYs{{X: x, Y: y}}, Labels: []string{label}})
	if err != nil {
		return err
	}
	l.TextStyle[0].Font.Size = vg.Points(9)
	l.TextStyle[0].YAlign = draw.YCenter
	l.TextStyle[0].XAlign = draw.XLeft
	l.Offset = vg.Point{X: vg.Points(8)}
	p.Add(l)
	return nil
}

// hline draws the dashed horizontal line y across the plot, in the legend.
func hline(p *plot.Plot, y float64, label string) error {
	l, err := plotter.NewLine(plotter.XYs{{X: p.X.Min, Y: y}, {X: p.X.Max, Y: y}})
	if err != nil {
		return err
	}
	l.Color, l.Width = boundColor, vg.Points(1.5)
	l.Dashes = []vg.Length{vg.Points(6), vg.Points(4)}
	p.Add(l)
	p.Legend.Add(label, l)
	return nil
}

// legend adds an entry for a series: its glyph in its colour.
func legend(p *plot.Plot, name string, c color.Color, shape draw.GlyphDrawer) {
	s, _ := plotter.NewScatter(plotter.XYs{{X: 0, Y: 0}}) // only its style is drawn
	s.GlyphStyle = draw.GlyphStyle{Color: c, Radius: vg.Points(4), Shape: shape}
	p.Legend.Add(name, s)
}

// capGlyph is the end of a whisker: a short horizontal stroke.
type capGlyph struct{}

func (capGlyph) DrawGlyph(c *draw.Canvas, sty draw.GlyphStyle, pt vg.Point) {
	c.SetLineStyle(draw.LineStyle{Color: sty.Color, Width: vg.Points(2)})
	var path vg.Path
	path.Move(vg.Point{X: pt.X - sty.Radius, Y: pt.Y})
	path.Line(vg.Point{X: pt.X + sty.Radius, Y: pt.Y})
	c.Stroke(path)
}

// ticks labels exactly these values, placed on the axis by to.
func ticks(vs []float64, to func(float64) float64) plot.ConstantTicks {
	t := make(plot.ConstantTicks, len(vs))
	for i, v := range vs {
		t[i] = plot.Tick{Value: to(v), Label: thousands(strconv.FormatFloat(v, 'f', -1, 64))}
	}
	return t
}

// The log axes are drawn as linear axes of log10 of the figures, with the
// ticks labelled by the figures: gonum's log scale centres an axis's label on
// the arithmetic middle of its range, which pads the plot off-centre.
func log10(v float64) float64 { return math.Log10(v) }

func linear(v float64) float64 { return v }

// thousands puts commas in an integer's digits: 2600 → 2,600.
func thousands(s string) string {
	if strings.ContainsAny(s, ".-") || len(s) <= 3 {
		return s
	}
	head := len(s) % 3
	out := s[:head]
	for i := head; i < len(s); i += 3 {
		if out != "" {
			out += ","
		}
		out += s[i : i+3]
	}
	return out
}

// categories lists the distinct keys of figs in the order they first appear.
func categories(figs []Figure, key func(Figure) string) []string {
	var out []string
	seen := map[string]bool{}
	for _, f := range figs {
		if k := key(f); !seen[k] {
			seen[k] = true
			out = append(out, k)
		}
	}
	return out
}

func index(names []string) map[string]int {
	m := make(map[string]int, len(names))
	for i, n := range names {
		m[n] = i
	}
	return m
}
