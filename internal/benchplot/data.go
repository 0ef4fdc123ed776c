// Package benchplot draws the plots of docs/benchmarks.md from the file that
// holds its headline figures (docs/benchmarks/headline.tsv), so that the page,
// its plots and the data file carry the same numbers, taken from the notebook.
package benchplot

import (
	"bufio"
	"fmt"
	"io"
	"math"
	"strconv"
	"strings"
)

// The plots a figure can belong to (the data file's first column).
const (
	PlotSingle  = "single"  // one node against a direct download
	PlotCluster = "cluster" // the namespace harness against the lower bound
	PlotSim     = "sim"     // the simulator against the lower bound, by node count
)

// columns is the data file's header, in order.
var columns = []string{"plot", "x", "series", "stat", "value", "low", "high", "runs", "date", "machine"}

// Figure is one row of the data file: one measured figure, as the notebook
// gives it. The numbers keep the notebook's text (Value, Low, High) beside
// their parsed values, so a label shows "1.0" where the notebook wrote 1.0.
type Figure struct {
	Plot   string
	X      string // the category (single, cluster) or the node count (sim)
	Series string // the mode or the case; empty for one series
	Stat   string // what the value is, e.g. "max ÷ bound"
	// Value is the median the notebook states, or a run's figure; Low and
	// High the range over runs. Either may be absent (empty text, NaN).
	Value, Low, High          string
	ValueNum, LowNum, HighNum float64
	Runs                      int
	Date, Machine             string
}

// HasValue says whether the figure has a single value (a median or a run).
func (f Figure) HasValue() bool { return f.Value != "" }

// HasRange says whether the figure has a range over runs.
func (f Figure) HasRange() bool { return f.Low != "" }

// Nodes is a simulator figure's node count (its X).
func (f Figure) Nodes() float64 {
	n, _ := strconv.ParseFloat(f.X, 64)
	return n
}

// Label is the figure as text: the value, the range, or both.
func (f Figure) Label() string {
	switch {
	case f.HasValue() && f.HasRange():
		return fmt.Sprintf("%s (%s–%s)", f.Value, f.Low, f.High)
	case f.HasRange():
		return f.Low + "–" + f.High
	default:
		return f.Value
	}
}

// Read parses the data file: lines starting with '#' and blank lines are
// comments, then a header naming the columns, then one figure a line, the
// fields separated by tabs.
func Read(r io.Reader) ([]Figure, error) {
	sc := bufio.NewScanner(r)
	var figs []Figure
	header := false
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if strings.TrimSpace(line) == "" || strings.HasPrefix(line, "#") {
			continue
		}
		fields := strings.Split(line, "\t")
		if !header {
			if strings.Join(fields, ",") != strings.Join(columns, ",") {
				return nil, fmt.Errorf("benchplot: line %d: header %q, want the columns %q", n, fields, columns)
			}
			header = true
			continue
		}
		f, err := parse(fields)
		if err != nil {
			return nil, fmt.Errorf("benchplot: line %d: %w", n, err)
		}
		figs = append(figs, f)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("benchplot: %w", err)
	}
	if !header {
		return nil, fmt.Errorf("benchplot: no header line")
	}
	return figs, nil
}

func parse(fields []string) (Figure, error) {
	if len(fields) != len(columns) {
		return Figure{}, fmt.Errorf("%d fields, want %d", len(fields), len(columns))
	}
	f := Figure{
		Plot: fields[0], X: fields[1], Series: fields[2], Stat: fields[3],
		Value: fields[4], Low: fields[5], High: fields[6],
		Date: fields[8], Machine: fields[9],
	}
	switch f.Plot {
	case PlotSingle, PlotCluster:
	case PlotSim:
		if n, err := strconv.ParseFloat(f.X, 64); err != nil || n <= 0 {
			return f, fmt.Errorf("sim: node count %q is not a positive number", f.X)
		}
	default:
		return f, fmt.Errorf("plot %q is none of %s, %s, %s", f.Plot, PlotSingle, PlotCluster, PlotSim)
	}
	if f.X == "" || f.Stat == "" {
		return f, fmt.Errorf("x and stat must be set")
	}
	var err error
	if f.ValueNum, err = number("value", f.Value); err != nil {
		return f, err
	}
	if f.LowNum, err = number("low", f.Low); err != nil {
		return f, err
	}
	if f.HighNum, err = number("high", f.High); err != nil {
		return f, err
	}
	switch {
	case (f.Low == "") != (f.High == ""):
		return f, fmt.Errorf("low and high go together (%q, %q)", f.Low, f.High)
	case f.Value == "" && f.Low == "":
		return f, fmt.Errorf("neither a value nor a range")
	case f.HasRange() && f.LowNum > f.HighNum:
		return f, fmt.Errorf("low %s above high %s", f.Low, f.High)
	}
	if f.Runs, err = strconv.Atoi(fields[7]); err != nil || f.Runs < 1 {
		return f, fmt.Errorf("runs %q is not a positive count", fields[7])
	}
	return f, nil
}

// number parses a positive figure; empty text is NaN (absent).
func number(name, s string) (float64, error) {
	if s == "" {
		return math.NaN(), nil
	}
	v, err := strconv.ParseFloat(s, 64)
	if err != nil || v <= 0 || math.IsInf(v, 0) {
		return 0, fmt.Errorf("%s %q is not a positive number", name, s)
	}
	return v, nil
}
