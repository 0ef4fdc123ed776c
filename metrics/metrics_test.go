package metrics

import (
	"fmt"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestNilRecordsNothing(t *testing.T) {
	var m *Metrics
	m.BlobBytes(SourceCache, 1)
	m.Upload("ok", 1)
	m.Piece("peer", "ok", time.Second)
	m.Blob("complete", time.Second)
	m.Request("blob", "GET", 200)
	m.Upstream("h", "GET", 0)
	m.AccessCheck("allowed")
	m.GC(1, 1, 1, 1)
	m.GaugeFunc("x", "x", func() float64 { return 1 })
	m.ParentWeights(func() map[string]float64 { return nil })
	if m.Gatherer() != nil {
		t.Error("nil metrics has a gatherer")
	}
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if rec.Code != 404 {
		t.Errorf("nil metrics handler: %d", rec.Code)
	}
}

func scrape(t *testing.T, m *Metrics) Values {
	t.Helper()
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	v, err := Parse(rec.Body)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func TestRecordedAndParsed(t *testing.T) {
	m := New("v1.2.3")
	m.ParentWeights(func() map[string]float64 { return map[string]float64{"node-a": 5e6, "node-b": 1e6} })
	m.GaugeFunc("tasks_in_flight", "t", func() float64 { return 3 })
	before := scrape(t, m)
	m.BlobBytes(SourceCache, 100)
	m.BlobBytes(SourcePeer, 40)
	m.BlobBytes(SourceUpstream, 2)
	m.BlobBytes(SourceUpstream, 0) // nothing: not even a series
	m.Piece(SourcePeer, "ok", 2*time.Second)
	m.Piece(SourcePeer, "busy", 0)
	m.Upstream("reg:5000", "GET", 200)
	m.Upstream("reg:5000", "GET", 0)
	m.GC(2, 1, 0, 4096)
	after := scrape(t, m)
	for _, tc := range []struct {
		name  string
		match []string
		want  float64
	}{
		{"registry_proxy_build_info", []string{`version="v1.2.3"`}, 1},
		{"registry_proxy_blob_bytes_total", nil, 142},
		{"registry_proxy_blob_bytes_total", []string{`source="cache"`}, 100},
		{"registry_proxy_pieces_total", []string{`parent="peer"`}, 2},
		{"registry_proxy_pieces_total", []string{`parent="peer"`, `result="busy"`}, 1},
		{"registry_proxy_piece_duration_seconds_count", nil, 1},
		{"registry_proxy_piece_duration_seconds_sum", nil, 2},
		{"registry_proxy_upstream_requests_total", []string{`code="error"`}, 1},
		{"registry_proxy_store_gc_removed_total", []string{`kind="blob"`}, 2},
		{"registry_proxy_store_gc_freed_bytes_total", nil, 4096},
		{"registry_proxy_parent_weight", []string{`parent="node-a"`}, 5e6},
		{"registry_proxy_tasks_in_flight", nil, 3},
	} {
		if got := after.Sum(tc.name, tc.match...); got != tc.want {
			t.Errorf("%s%v = %v, want %v", tc.name, tc.match, got, tc.want)
		}
	}
	moved := Moved(before, after)
	var names []string
	for _, c := range moved {
		names = append(names, c.Series)
		if strings.Contains(c.Series, "tasks_in_flight") || strings.Contains(c.Series, "parent_weight") {
			t.Errorf("%s did not change but is listed as moved", c.Series)
		}
	}
	if !strings.Contains(strings.Join(names, " "), `registry_proxy_blob_bytes_total{source="peer"}`) {
		t.Errorf("moved: %v", names)
	}
}

// Labels come from bounded sets whatever clients send: methods of their
// own count as "other".
func TestRequestLabelsBounded(t *testing.T) {
	m := New("test")
	for i := range 30000 {
		m.Request("blob", fmt.Sprintf("M%d", i), 405)
	}
	m.Request("blob", "GET", 200)
	fams, err := m.Gatherer().Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if f.GetName() == "registry_proxy_http_requests_total" && len(f.GetMetric()) != 2 {
			t.Fatalf("%d series after 30,000 odd methods; want 2 (GET and other)", len(f.GetMetric()))
		}
	}
}

// Families lists what is registered, vectors without series included, and
// nothing else.
func TestFamilies(t *testing.T) {
	m := New("test")
	m.GaugeFunc("tasks_in_flight", "t", func() float64 { return 0 })
	m.ParentWeights(func() map[string]float64 { return nil })
	got, err := m.Families()
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"registry_proxy_private_refusals_total", "registry_proxy_peer_calls_refused_total",
		"registry_proxy_blob_download_duration_seconds", "registry_proxy_tasks_in_flight", "registry_proxy_parent_weight",
		"registry_proxy_build_info", "go_goroutines", "process_start_time_seconds"} {
		if !slices.Contains(got, want) {
			t.Errorf("%s not among %v", want, got)
		}
	}
	for _, not := range []string{"registry_proxy_made_up_total", "registry_proxy_blob_download_duration_seconds_bucket", "registry_proxy_store_bytes"} {
		if slices.Contains(got, not) {
			t.Errorf("%s listed", not)
		}
	}
	if !slices.IsSorted(got) {
		t.Errorf("not sorted: %v", got)
	}
	if f, err := (*Metrics)(nil).Families(); f != nil || err != nil {
		t.Errorf("nil metrics: %v, %v", f, err)
	}
}
