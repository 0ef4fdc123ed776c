package dashboard

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakePrometheus answers every query with one series per source label
// value, and records the queries.
type fakePrometheus struct {
	mu      sync.Mutex
	queries []string
}

func (f *fakePrometheus) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query().Get("query")
	f.mu.Lock()
	f.queries = append(f.queries, r.URL.Path+" "+q)
	f.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	switch {
	case strings.Contains(q, "empty"):
		fmt.Fprint(w, `{"status":"success","data":{"resultType":"matrix","result":[]}}`)
	case strings.Contains(q, "bad"):
		w.WriteHeader(http.StatusBadRequest)
		fmt.Fprint(w, `{"status":"error","errorType":"bad_data","error":"parse error"}`)
	case r.URL.Path == "/api/v1/query":
		fmt.Fprint(w, `{"status":"success","data":{"resultType":"vector","result":[{"metric":{"source":"peer"},"value":[1000,"0.75"]}]}}`)
	default:
		fmt.Fprint(w, `{"status":"success","data":{"resultType":"matrix","result":[
			{"metric":{"source":"upstream"},"values":[[1000,"1048576"],[1002,"2097152"],[1004,"NaN"],[1006,"3e6"]]},
			{"metric":{"source":"peer"},"values":[[1000,"5"],[1010,"6"]]}]}}`)
	}
}

const testDashboard = `{
	"title": "T",
	"templating": {"list": [{"name": "instance", "type": "query", "allValue": ".*"}]},
	"panels": [
		{"id": 1, "type": "row", "title": "Row one", "gridPos": {"h": 1, "w": 24, "x": 0, "y": 0}},
		{"id": 2, "type": "timeseries", "title": "Bytes", "gridPos": {"h": 8, "w": 12, "x": 0, "y": 1},
			"fieldConfig": {"defaults": {"unit": "Bps"}},
			"targets": [{"refId": "A", "expr": "sum by (source) (rate(b{instance=~\"$instance\"}[$__rate_interval]))", "legendFormat": "from {{source}}"}]},
		{"id": 3, "type": "stat", "title": "Share", "gridPos": {"h": 4, "w": 6, "x": 12, "y": 1},
			"fieldConfig": {"defaults": {"unit": "percentunit", "thresholds": {"steps": [{"color": "green", "value": null}, {"color": "red", "value": 0.5}]}}},
			"targets": [{"refId": "A", "expr": "x[$__range]", "instant": true}]},
		{"id": 4, "type": "bargauge", "title": "Bars", "gridPos": {"h": 4, "w": 6, "x": 18, "y": 1},
			"targets": [{"refId": "A", "expr": "y", "legendFormat": "{{source}}", "instant": true}]},
		{"id": 5, "type": "timeseries", "title": "Nothing", "gridPos": {"h": 4, "w": 12, "x": 12, "y": 5},
			"targets": [{"refId": "A", "expr": "empty"}]}]}`

func TestRender(t *testing.T) {
	f := &fakePrometheus{}
	srv := httptest.NewServer(f)
	defer srv.Close()
	d, err := Parse([]byte(testDashboard))
	if err != nil {
		t.Fatal(err)
	}
	start := time.Unix(1000, 0)
	o := Options{Prometheus: Prometheus{URL: srv.URL}, Start: start, End: start.Add(5 * time.Minute), Step: 2 * time.Second,
		RateInterval: 10 * time.Second, Width: 1600, Caption: "a test"}
	page, height, err := Render(context.Background(), d, o)
	if err != nil {
		t.Fatal(err)
	}
	// Row 1 starts at 38 px, panel 2 is 8 rows high: 1+8 rows of the grid.
	if want := headerH + 9*(cellH+margin) - margin + pagePad; height != want {
		t.Errorf("height %d, want %d", height, want)
	}
	html := string(page)
	for _, want := range []string{
		"Row one", "from upstream", "from peer", "<polyline", // a line through the upstream series' first two points
		`<circle`,            // peer's points are 10 s apart at a 2 s step: two dots, no line
		`color:#F2495C">75%`, // the stat, over its red threshold
		`>75%</div>`,         // the bar
		"No data", "a test", "instance: All",
		">3 MB/s<", // an axis label in the panel's unit
	} {
		if !strings.Contains(html, want) {
			t.Errorf("page lacks %q", want)
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	want := []string{
		`/api/v1/query_range sum by (source) (rate(b{instance=~".*"}[10s]))`,
		`/api/v1/query x[300s]`,
		`/api/v1/query y`,
		`/api/v1/query_range empty`,
	}
	if strings.Join(f.queries, "\n") != strings.Join(want, "\n") {
		t.Errorf("queries:\n%s\nwant\n%s", strings.Join(f.queries, "\n"), strings.Join(want, "\n"))
	}
}

func TestRenderRefuses(t *testing.T) {
	srv := httptest.NewServer(&fakePrometheus{})
	defer srv.Close()
	o := Options{Prometheus: Prometheus{URL: srv.URL}, Start: time.Unix(0, 0), End: time.Unix(300, 0), Step: time.Second, Width: 800}
	for _, tc := range []struct{ expr, want string }{
		{`a{instance=~"$node"}`, "no value for $node"},
		{`bad`, "parse error"},
	} {
		d, _ := Parse([]byte(`{"panels": [{"id": 1, "type": "timeseries", "targets": [{"refId": "A", "expr": ` + fmt.Sprintf("%q", tc.expr) + `}]}]}`))
		if _, _, err := Render(context.Background(), d, o); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error with %q", tc.expr, err, tc.want)
		}
	}
}

func TestFormat(t *testing.T) {
	two := 2
	for _, tc := range []struct {
		unit string
		dec  *int
		v    float64
		want string
	}{
		{"bytes", nil, 3 << 30, "3 GiB"},
		{"bytes", nil, 1536, "1.5 KiB"},
		{"Bps", nil, 52e6, "52 MB/s"},
		{"percentunit", nil, 0.3333, "33.3%"},
		{"s", nil, 0.25, "250 ms"},
		{"s", nil, 90, "1.5 min"},
		{"none", &two, 1.004, "1.00"},
		{"none", nil, 12345, "12.3 K"},
		{"reqps", nil, 0.5, "0.5 req/s"},
	} {
		p := Panel{}
		p.FieldConfig.Defaults.Unit, p.FieldConfig.Defaults.Decimals = tc.unit, tc.dec
		if got := format(tc.v, p); got != tc.want {
			t.Errorf("format(%v, %s) = %q, want %q", tc.v, tc.unit, got, tc.want)
		}
	}
}

func TestAxisStep(t *testing.T) {
	for _, tc := range []struct {
		x    float64
		unit string
		want float64
	}{
		{47.7 * (1 << 20), "bytes", 50 << 20},
		{700, "bytes", 1000},
		{0.7e6, "Bps", 1e6},
		{0.03, "s", 0.05},
		{0.22, "percentunit", 0.25},
	} {
		if got := axisStep(tc.x, tc.unit); got != tc.want {
			t.Errorf("axisStep(%v, %s) = %v, want %v", tc.x, tc.unit, got, tc.want)
		}
	}
}
