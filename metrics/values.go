package metrics

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Values are a scrape's samples: counters and gauges by series, histograms
// as their _count and _sum. A series is written as Prometheus shows it:
// name{label="value",...}, labels sorted.
type Values map[string]float64

// Parse reads Prometheus' text format.
func Parse(r io.Reader) (Values, error) {
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(r)
	if err != nil {
		return nil, fmt.Errorf("metrics: parse: %w", err)
	}
	v := Values{}
	for name, f := range fams {
		for _, m := range f.GetMetric() {
			key := series(name, m.GetLabel())
			switch f.GetType() {
			case dto.MetricType_COUNTER:
				v[key] = m.GetCounter().GetValue()
			case dto.MetricType_GAUGE:
				v[key] = m.GetGauge().GetValue()
			case dto.MetricType_UNTYPED:
				v[key] = m.GetUntyped().GetValue()
			case dto.MetricType_HISTOGRAM:
				v[series(name+"_count", m.GetLabel())] = float64(m.GetHistogram().GetSampleCount())
				v[series(name+"_sum", m.GetLabel())] = m.GetHistogram().GetSampleSum()
			}
		}
	}
	return v, nil
}

func series(name string, labels []*dto.LabelPair) string {
	if len(labels) == 0 {
		return name
	}
	parts := make([]string, 0, len(labels))
	for _, l := range labels {
		parts = append(parts, fmt.Sprintf("%s=%q", l.GetName(), l.GetValue()))
	}
	slices.Sort(parts)
	return name + "{" + strings.Join(parts, ",") + "}"
}

// Scrape fetches and parses the metrics at url (an admin listener's
// /metrics).
func Scrape(ctx context.Context, url string) (Values, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("metrics: %s: %s", url, resp.Status)
	}
	return Parse(resp.Body)
}

// Sum adds the series of metric name whose labels include every
// label="value" pair given in match.
func (v Values) Sum(name string, match ...string) float64 {
	var sum float64
	for k, x := range v {
		base, labels, _ := strings.Cut(k, "{")
		if base != name {
			continue
		}
		ok := true
		for _, m := range match {
			if !strings.Contains(","+strings.TrimSuffix(labels, "}")+",", ","+m+",") {
				ok = false
				break
			}
		}
		if ok {
			sum += x
		}
	}
	return sum
}

// Change is one series that moved between two scrapes.
type Change struct {
	Series        string
	Before, After float64
}

// Moved lists the registry_proxy_ series that changed from before to after
// (new ones count from 0), sorted by series.
func Moved(before, after Values) []Change {
	var out []Change
	for k, a := range after {
		if !strings.HasPrefix(k, ns+"_") {
			continue
		}
		if b := before[k]; b != a {
			out = append(out, Change{Series: k, Before: b, After: a})
		}
	}
	slices.SortFunc(out, func(a, b Change) int { return strings.Compare(a.Series, b.Series) })
	return out
}
