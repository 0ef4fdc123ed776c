package dashboard

import (
	"slices"
	"strings"
	"testing"
)

func TestMetricNames(t *testing.T) {
	for _, tc := range []struct {
		expr string
		want []string
		err  string // in the error; empty: none
	}{
		{expr: `up`, want: []string{"up"}},
		{expr: `registry_proxy_store_bytes{instance=~"$instance"}`, want: []string{"registry_proxy_store_bytes"}},
		{expr: `sum by (source) (rate(registry_proxy_blob_bytes_total{instance=~"$instance", source!="x"}[$__rate_interval]))`,
			want: []string{"registry_proxy_blob_bytes_total"}},
		{expr: `histogram_quantile(0.9, sum by (le, parent) (rate(a_seconds_bucket[5m])))`, want: []string{"a_seconds_bucket"}},
		{expr: `sum(rate(a_sum[1m])) / sum(rate(a_count[1m]))`, want: []string{"a_count", "a_sum"}},
		// Label names in lists and braces are not metrics; label values
		// that look like metric names neither.
		{expr: `a * on (instance) group_left (version) b{version="c", source=~"d|e"}`, want: []string{"a", "b"}},
		{expr: `sum(x) without (instance, job)`, want: []string{"x"}},
		{expr: `a / ignoring(source) group_left sum without(source) (b)`, want: []string{"a", "b"}},
		// Keywords in any case, numbers, durations, offsets and @.
		{expr: `a > bool 0.5e3 AND b OR c unless d`, want: []string{"a", "b", "c", "d"}},
		{expr: `rate(a[5m] offset 1h30m) + a @ end() - 0x1f * Inf + NaN`, want: []string{"a"}},
		{expr: `max_over_time(rate(a[1m])[10m:30s])`, want: []string{"a"}},
		{expr: `SUM BY (x) (a)`, want: []string{"a"}},
		// Strings with brackets and quotes inside, label_replace's
		// arguments, comments, Grafana variables of every form.
		{expr: `label_replace(a{p="}{[("}, "dst", "$1", "src", "(.*)")`, want: []string{"a"}},
		{expr: "a{p=`x}`} # not_a_metric{}\n+ b", want: []string{"a", "b"}},
		{expr: `a[$__rate_interval] * ${scale} + b[[[interval]]] / $var`, want: []string{"a", "b"}},
		{expr: `recorded:rate5m{instance="x"}`, want: []string{"recorded:rate5m"}},
		{expr: `count(count by (version) (registry_proxy_build_info))`, want: []string{"registry_proxy_build_info"}},
		{expr: `vector(1)`, want: nil},
		// What cannot be vouched for.
		{expr: `rat(a[5m])`, err: `unknown function "rat"`},
		{expr: `Rate(a[5m])`, err: `unknown function "Rate"`},
		{expr: `{__name__="a"}`, err: "without a metric name"},
		{expr: `a{__name__=~"b.*"}`, err: "__name__"},
		{expr: `sum(a{x="y"`, err: "unclosed {"},
		{expr: `a{x="y}`, err: "unclosed"},
		{expr: `rate(a[5m)`, err: "unclosed ["},
	} {
		got, err := MetricNames(tc.expr)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("MetricNames(%q) = %v, %v; want an error with %q", tc.expr, got, err, tc.err)
			}
			continue
		}
		if err != nil || !slices.Equal(got, tc.want) {
			t.Errorf("MetricNames(%q) = %q, %v; want %q", tc.expr, got, err, tc.want)
		}
	}
}

func TestQueries(t *testing.T) {
	d, err := Parse([]byte(`{
		"panels": [
			{"id": 1, "type": "row", "title": "R", "panels": [
				{"id": 2, "type": "stat", "title": "S", "targets": [{"refId": "A", "expr": "a"}]}]},
			{"id": 3, "type": "timeseries", "title": "T", "targets": [{"refId": "A", "expr": "b"}, {"refId": "B", "expr": "c"}]}],
		"templating": {"list": [
			{"name": "datasource", "type": "datasource", "query": "prometheus"},
			{"name": "instance", "type": "query", "query": {"query": "label_values(d{job=\"x\",y=\"z\"}, instance)"}},
			{"name": "job", "type": "query", "query": "label_values(job)"}]}}`))
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, q := range d.Queries() {
		got = append(got, q.Where+": "+q.Expr)
	}
	want := []string{"panel 2 (S) A: a", "panel 3 (T) A: b", "panel 3 (T) B: c",
		`variable instance: d{job="x",y="z"}`, "variable job: "}
	if !slices.Equal(got, want) {
		t.Errorf("queries:\n%q\nwant\n%q", got, want)
	}
}
