package dashboard

import (
	"context"
	"fmt"
	"html"
	"math"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Options of a preview.
type Options struct {
	Prometheus Prometheus
	Start, End time.Time
	Step       time.Duration
	// RateInterval stands for $__rate_interval (Grafana: four scrape
	// intervals at least).
	RateInterval time.Duration
	// Vars are variables' values as they go into PromQL; a query variable
	// not given takes its allValue (All).
	Vars map[string]string
	// Width of the page in pixels.
	Width   int
	Caption string
}

// Grafana's grid: 24 columns, rows 30 px high, 8 px between panels.
const (
	cellH   = 30
	margin  = 8
	headerH = 96
	pagePad = 12
)

// Grafana's classic palette and its threshold colours.
var (
	palette = []string{"#7EB26D", "#EAB839", "#6ED0E0", "#EF843C", "#E24D42", "#1F78C1", "#BA43A9", "#705DA0",
		"#508642", "#CCA300", "#447EBC", "#C15C17", "#890F02", "#0A437C", "#6D1F62", "#584477"}
	namedColors = map[string]string{"green": "#73BF69", "orange": "#FF9830", "red": "#F2495C", "yellow": "#FADE2A", "blue": "#5794F2"}
)

// Render draws d from Prometheus' answers as a static HTML page (inline
// SVG, no script): every panel where its gridPos puts it, time series as
// lines, stats as their last value, bar gauges as bars. It is a preview of
// the queries' data, not Grafana. It returns the page and its height.
func Render(ctx context.Context, d *Dashboard, o Options) ([]byte, int, error) {
	vars := map[string]string{}
	for _, v := range d.Templating.List {
		if v.Type == "query" {
			vars[v.Name] = v.AllValue
		}
	}
	for k, v := range o.Vars {
		vars[k] = v
	}
	vars["__rate_interval"] = promDuration(o.RateInterval)
	vars["__interval"] = promDuration(o.Step)
	vars["__range"] = promDuration(o.End.Sub(o.Start))
	vars["__range_s"] = strconv.Itoa(int(o.End.Sub(o.Start).Seconds()))

	colW := float64(o.Width-2*pagePad) / 24
	bottom := 0
	var b strings.Builder
	for _, p := range d.Panels {
		g := p.GridPos
		x := pagePad + int(float64(g.X)*colW)
		y := headerH + g.Y*(cellH+margin)
		w := int(float64(g.W)*colW) - margin
		h := g.H*cellH + (g.H-1)*margin
		bottom = max(bottom, y+h)
		if p.Type == "row" {
			fmt.Fprintf(&b, `<div class="row" style="left:%dpx;top:%dpx;width:%dpx;height:%dpx">%s</div>`+"\n", x, y, w, h, esc(p.Title))
			continue
		}
		data, err := query(ctx, p, o, vars)
		if err != nil {
			return nil, 0, err
		}
		fmt.Fprintf(&b, `<div class="panel" style="left:%dpx;top:%dpx;width:%dpx;height:%dpx"><div class="title">%s</div>`, x, y, w, h, esc(p.Title))
		inner := h - 30
		switch {
		case !hasPoints(data):
			fmt.Fprintf(&b, `<div class="nodata" style="height:%dpx">No data</div>`, inner)
		case p.Type == "stat":
			stat(&b, p, data, w, inner)
		case p.Type == "bargauge":
			bargauge(&b, p, data, w, inner)
		default:
			timeseries(&b, p, data, o, w-16, inner)
		}
		b.WriteString("</div>\n")
	}
	height := bottom + pagePad
	var page strings.Builder
	fmt.Fprintf(&page, `<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>%s</title><style>
body{margin:0;background:#111217;color:#ccccdc;font:12px/1.35 "DejaVu Sans",Arial,sans-serif;width:%dpx;height:%dpx;position:relative;overflow:hidden}
.head{position:absolute;left:%dpx;top:8px;right:%dpx}
.head h1{font-size:18px;font-weight:500;margin:0 0 4px;color:#fff}
.head .meta{color:#9fa7b3}
.head .cap{color:#d8a84e;margin-top:2px;max-height:34px;overflow:hidden}
.row{position:absolute;font-size:14px;font-weight:500;color:#fff;border-bottom:1px solid #2c3235;line-height:30px}
.panel{position:absolute;background:#181b1f;border:1px solid #2c3235;border-radius:2px;box-sizing:border-box;overflow:hidden}
.title{height:28px;line-height:28px;padding:0 8px;font-weight:500;color:#fff;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.nodata{display:flex;align-items:center;justify-content:center;color:#8e8e8e}
.stat{display:flex;align-items:center;justify-content:space-around}
.stat .v{font-weight:500;text-align:center;line-height:1.1}
.stat .n{font-size:11px;color:#9fa7b3;text-align:center}
.legend{padding:0 8px;font-size:11px;color:#ccccdc;overflow:hidden}
.legend span{display:inline-block;margin-right:12px;white-space:nowrap}
.legend i{display:inline-block;width:14px;height:4px;margin-right:4px;vertical-align:middle;border-radius:1px}
.bars{padding:2px 8px}
.bars .b{display:flex;align-items:center;margin:2px 0}
.bars .l{width:26%%;overflow:hidden;white-space:nowrap;text-overflow:ellipsis}
.bars .t{flex:1;height:100%%;background:#22252b;margin:0 6px;position:relative}
.bars .f{position:absolute;left:0;top:0;bottom:0}
.bars .x{width:64px;text-align:right;font-weight:500}
svg text{fill:#9fa7b3;font-size:10px}
</style></head><body>
<div class="head"><h1>%s</h1><div class="meta">%s</div><div class="cap">%s</div></div>
`, esc(d.Title), o.Width, height, pagePad, pagePad, esc(d.Title), esc(meta(d, o, vars)), esc(o.Caption))
	page.WriteString(b.String())
	page.WriteString("</body></html>\n")
	return []byte(page.String()), height, nil
}

func meta(d *Dashboard, o Options, vars map[string]string) string {
	parts := []string{fmt.Sprintf("%s – %s UTC", o.Start.UTC().Format("2006-01-02 15:04:05"), o.End.UTC().Format("15:04:05")),
		"data source: Prometheus " + o.Prometheus.URL}
	for _, v := range d.Templating.List {
		if v.Type == "query" {
			val := vars[v.Name]
			if val == v.AllValue {
				val = "All"
			}
			parts = append(parts, v.Name+": "+val)
		}
	}
	parts = append(parts, "$__rate_interval = "+vars["__rate_interval"], "step "+o.Step.String())
	return strings.Join(parts, " · ")
}

// shown is one series as a panel shows it.
type shown struct {
	name   string
	points []Point
}

// query runs a panel's targets: range queries for time series, and for a
// stat or bar gauge the instant query a target asks for (else its range's
// last point).
func query(ctx context.Context, p Panel, o Options, vars map[string]string) ([]shown, error) {
	var out []shown
	for _, t := range p.Targets {
		expr, err := expand(t.Expr, vars)
		if err != nil {
			return nil, fmt.Errorf("panel %d (%s) %s: %w", p.ID, p.Title, t.RefID, err)
		}
		var series []Series
		if t.Instant && p.Type != "timeseries" {
			series, err = o.Prometheus.Instant(ctx, expr, o.End)
		} else {
			series, err = o.Prometheus.Range(ctx, expr, o.Start, o.End, o.Step)
		}
		if err != nil {
			return nil, fmt.Errorf("panel %d (%s) %s: %w", p.ID, p.Title, t.RefID, err)
		}
		var got []shown
		for _, s := range series {
			got = append(got, shown{name: legend(t.LegendFormat, s.Labels, expr), points: s.Points})
		}
		slices.SortFunc(got, func(a, b shown) int { return strings.Compare(a.name, b.name) })
		out = append(out, got...)
	}
	return out, nil
}

var variable = regexp.MustCompile(`\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]`)

// expand puts the variables' values into expr; a variable without one is an
// error.
func expand(expr string, vars map[string]string) (string, error) {
	var missing []string
	out := variable.ReplaceAllStringFunc(expr, func(m string) string {
		sub := variable.FindStringSubmatch(m)
		name := sub[1] + sub[2] + sub[3]
		v, ok := vars[name]
		if !ok {
			missing = append(missing, m)
		}
		return v
	})
	if missing != nil {
		return "", fmt.Errorf("no value for %s in %q", strings.Join(missing, ", "), expr)
	}
	return out, nil
}

var legendLabel = regexp.MustCompile(`\{\{\s*(\w+)\s*\}\}`)

func legend(format string, labels map[string]string, expr string) string {
	if format != "" && format != "__auto" {
		return legendLabel.ReplaceAllStringFunc(format, func(m string) string {
			return labels[legendLabel.FindStringSubmatch(m)[1]]
		})
	}
	if len(labels) == 0 {
		return expr
	}
	var kv []string
	for k, v := range labels {
		kv = append(kv, fmt.Sprintf("%s=%q", k, v))
	}
	slices.Sort(kv)
	return "{" + strings.Join(kv, ", ") + "}"
}

// promDuration writes d as PromQL does: whole seconds, else milliseconds.
func promDuration(d time.Duration) string {
	if d%time.Second == 0 {
		return fmt.Sprintf("%ds", int64(d/time.Second))
	}
	return fmt.Sprintf("%dms", d.Milliseconds())
}

func hasPoints(data []shown) bool {
	for _, s := range data {
		for _, p := range s.points {
			if !math.IsNaN(p.V) && !math.IsInf(p.V, 0) {
				return true
			}
		}
	}
	return false
}

// last is a series' last finite value.
func last(s shown) (float64, bool) {
	for i := len(s.points) - 1; i >= 0; i-- {
		if v := s.points[i].V; !math.IsNaN(v) && !math.IsInf(v, 0) {
			return v, true
		}
	}
	return 0, false
}

func stat(b *strings.Builder, p Panel, data []shown, w, h int) {
	n := 0
	for _, s := range data {
		if _, ok := last(s); ok {
			n++
		}
	}
	size := min(float64(h)*0.55, float64(w)/float64(max(n, 1))/4.5, 40)
	fmt.Fprintf(b, `<div class="stat" style="height:%dpx">`, h)
	for _, s := range data {
		v, ok := last(s)
		if !ok {
			continue
		}
		fmt.Fprintf(b, `<div><div class="v" style="font-size:%.0fpx;color:%s">%s</div>`, size, thresholdColor(p, v), esc(format(v, p)))
		if n > 1 {
			fmt.Fprintf(b, `<div class="n">%s</div>`, esc(s.name))
		}
		b.WriteString("</div>")
	}
	b.WriteString("</div>")
}

func thresholdColor(p Panel, v float64) string {
	c := "#73BF69"
	for _, st := range p.FieldConfig.Defaults.Thresholds.Steps {
		if st.Value == nil || v >= *st.Value {
			c = st.Color
		}
	}
	if named, ok := namedColors[c]; ok {
		return named
	}
	return c
}

func bargauge(b *strings.Builder, p Panel, data []shown, w, h int) {
	top := 0.0
	for _, s := range data {
		if v, ok := last(s); ok {
			top = max(top, v)
		}
	}
	if m := p.FieldConfig.Defaults.Max; m != nil {
		top = *m
	}
	rowH := min(28, (h-8)/max(len(data), 1))
	fmt.Fprintf(b, `<div class="bars">`)
	for i, s := range data {
		v, ok := last(s)
		if !ok {
			continue
		}
		frac := 0.0
		if top > 0 {
			frac = math.Max(0, math.Min(1, v/top))
		}
		color := palette[i%len(palette)]
		fmt.Fprintf(b, `<div class="b" style="height:%dpx"><div class="l">%s</div><div class="t"><div class="f" style="width:%.1f%%;background:%s"></div></div><div class="x" style="color:%s">%s</div></div>`,
			rowH-4, esc(s.name), frac*100, color, color, esc(format(v, p)))
	}
	b.WriteString("</div>")
}

func timeseries(b *strings.Builder, p Panel, data []shown, o Options, w, h int) {
	// The legend: as many rows as the names need, at most four.
	rows, used := 1, 0
	for _, s := range data {
		iw := 30 + int(6.2*float64(len([]rune(s.name))))
		if used > 0 && used+iw > w {
			rows++
			used = 0
		}
		used += iw
	}
	rows = min(rows, 4)
	legendH := rows*15 + 4
	ch := h - legendH - 4
	const left, right, top, bottom = 62, 10, 6, 18
	pw, ph := float64(w-left-right), float64(ch-top-bottom)

	lo, hi := math.Inf(1), math.Inf(-1)
	for _, s := range data {
		for _, pt := range s.points {
			if !math.IsNaN(pt.V) && !math.IsInf(pt.V, 0) {
				lo, hi = math.Min(lo, pt.V), math.Max(hi, pt.V)
			}
		}
	}
	if m := p.FieldConfig.Defaults.Min; m != nil {
		lo = math.Min(lo, *m)
	}
	lo = math.Min(lo, 0)
	if m := p.FieldConfig.Defaults.Max; m != nil {
		hi = *m
	}
	step := axisStep((hi-lo)/4, p.FieldConfig.Defaults.Unit)
	if hi <= lo || step <= 0 {
		hi, step = lo+1, 0.25
	}
	hi = math.Ceil(hi/step) * step
	lo = math.Floor(lo/step) * step
	span := o.End.Sub(o.Start).Seconds()
	px := func(t time.Time) float64 { return left + pw*t.Sub(o.Start).Seconds()/span }
	py := func(v float64) float64 { return top + ph*(1-(v-lo)/(hi-lo)) }

	fmt.Fprintf(b, `<svg width="%d" height="%d" style="margin:0 8px;display:block">`, w, ch)
	for v := lo; v <= hi+step/2; v += step {
		y := py(v)
		fmt.Fprintf(b, `<line x1="%d" x2="%.1f" y1="%.1f" y2="%.1f" stroke="#2c3235"/><text x="%d" y="%.1f" text-anchor="end">%s</text>`,
			left, left+pw, y, y, left-6, y+3, esc(format(v, p)))
	}
	tick := timeStep(o.End.Sub(o.Start))
	for t := o.Start.Truncate(tick).Add(tick); !t.After(o.End); t = t.Add(tick) {
		x := px(t)
		layout := "15:04"
		if tick < time.Minute {
			layout = "15:04:05"
		}
		fmt.Fprintf(b, `<line x1="%.1f" x2="%.1f" y1="%d" y2="%.1f" stroke="#2c3235"/><text x="%.1f" y="%.1f" text-anchor="middle">%s</text>`,
			x, x, top, top+ph, x, top+ph+13, t.UTC().Format(layout))
	}
	for i, s := range data {
		color := palette[i%len(palette)]
		var seg []string
		var prev time.Time
		flush := func() {
			switch len(seg) {
			case 0:
			case 1: // a lone point: a dot, so it is seen
				xy := strings.Split(seg[0], ",")
				fmt.Fprintf(b, `<circle cx="%s" cy="%s" r="1.8" fill="%s"/>`, xy[0], xy[1], color)
			default:
				fmt.Fprintf(b, `<polyline fill="none" stroke="%s" stroke-width="1.5" points="%s"/>`, color, strings.Join(seg, " "))
			}
			seg = seg[:0]
		}
		for _, pt := range s.points {
			if math.IsNaN(pt.V) || math.IsInf(pt.V, 0) || (!prev.IsZero() && pt.T.Sub(prev) > o.Step*3/2) {
				flush()
			}
			if !math.IsNaN(pt.V) && !math.IsInf(pt.V, 0) {
				seg = append(seg, fmt.Sprintf("%.1f,%.1f", px(pt.T), py(pt.V)))
			}
			prev = pt.T
		}
		flush()
	}
	b.WriteString("</svg>")
	fmt.Fprintf(b, `<div class="legend" style="height:%dpx">`, legendH)
	for i, s := range data {
		fmt.Fprintf(b, `<span><i style="background:%s"></i>%s</span>`, palette[i%len(palette)], esc(s.name))
	}
	b.WriteString("</div>")
}

// axisStep is the value axis' tick interval near x: niceStep, of KiB, MiB,
// GiB... for bytes.
func axisStep(x float64, unit string) float64 {
	if unit == "bytes" && x >= 1024 {
		scale := math.Pow(1024, math.Floor(math.Log(x)/math.Log(1024)))
		return niceStep(x/scale) * scale
	}
	return niceStep(x)
}

// niceStep rounds x up to 1, 2, 2.5 or 5 times a power of ten.
func niceStep(x float64) float64 {
	if x <= 0 || math.IsInf(x, 0) || math.IsNaN(x) {
		return 0
	}
	p := math.Pow(10, math.Floor(math.Log10(x)))
	for _, m := range []float64{1, 2, 2.5, 5, 10} {
		if m*p >= x {
			return m * p
		}
	}
	return 10 * p
}

// timeStep is the time axis' tick interval: about six ticks.
func timeStep(span time.Duration) time.Duration {
	for _, s := range []time.Duration{10 * time.Second, 15 * time.Second, 30 * time.Second, time.Minute, 2 * time.Minute,
		5 * time.Minute, 10 * time.Minute, 15 * time.Minute, 30 * time.Minute, time.Hour, 3 * time.Hour, 6 * time.Hour} {
		if span/s <= 8 {
			return s
		}
	}
	return 24 * time.Hour
}

// format writes v in the panel's unit, as Grafana's units of the same
// names do (bytes: IEC; Bps: SI).
func format(v float64, p Panel) string {
	dec := -1
	if d := p.FieldConfig.Defaults.Decimals; d != nil {
		dec = *d
	}
	num := func(x float64) string {
		if dec >= 0 {
			return strconv.FormatFloat(x, 'f', dec, 64)
		}
		switch ax := math.Abs(x); {
		case ax == 0 || ax >= 100:
			return strconv.FormatFloat(x, 'f', 0, 64)
		case ax >= 10:
			return strings.TrimSuffix(strings.TrimRight(strconv.FormatFloat(x, 'f', 1, 64), "0"), ".")
		default:
			return strings.TrimSuffix(strings.TrimRight(strconv.FormatFloat(x, 'f', 2, 64), "0"), ".")
		}
	}
	scaled := func(x, base float64, units []string, suffix string) string {
		i := 0
		for math.Abs(x) >= base && i < len(units)-1 {
			x /= base
			i++
		}
		return num(x) + " " + units[i] + suffix
	}
	switch p.FieldConfig.Defaults.Unit {
	case "bytes":
		return scaled(v, 1024, []string{"B", "KiB", "MiB", "GiB", "TiB"}, "")
	case "Bps":
		return scaled(v, 1000, []string{"B", "kB", "MB", "GB", "TB"}, "/s")
	case "percentunit":
		return num(v*100) + "%"
	case "s":
		switch av := math.Abs(v); {
		case av == 0:
			return "0 s"
		case av < 1:
			return num(v*1000) + " ms"
		case av < 60:
			return num(v) + " s"
		default:
			return num(v/60) + " min"
		}
	case "reqps":
		return strings.TrimSpace(scaled(v, 1000, []string{"", "K", "M"}, "")) + " req/s"
	case "ops":
		return strings.TrimSpace(scaled(v, 1000, []string{"", "K", "M"}, "")) + " ops/s"
	default:
		return strings.TrimSpace(scaled(v, 1000, []string{"", "K", "Mil", "Bil"}, ""))
	}
}

func esc(s string) string { return html.EscapeString(s) }
