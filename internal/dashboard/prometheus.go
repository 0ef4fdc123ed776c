package dashboard

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/url"
	"strconv"
	"time"
)

// Prometheus asks a Prometheus server's HTTP API.
type Prometheus struct {
	URL    string // http://127.0.0.1:9090
	Client *http.Client
}

// Series is one series of an answer; an instant answer has one point.
type Series struct {
	Labels map[string]string
	Points []Point
}

// Point is one sample.
type Point struct {
	T time.Time
	V float64
}

// Range runs a range query (/api/v1/query_range).
func (p Prometheus) Range(ctx context.Context, expr string, start, end time.Time, step time.Duration) ([]Series, error) {
	q := url.Values{"query": {expr}, "start": {unix(start)}, "end": {unix(end)}, "step": {strconv.FormatFloat(step.Seconds(), 'f', -1, 64)}}
	return p.get(ctx, "/api/v1/query_range", q)
}

// Instant runs an instant query at t (/api/v1/query).
func (p Prometheus) Instant(ctx context.Context, expr string, t time.Time) ([]Series, error) {
	return p.get(ctx, "/api/v1/query", url.Values{"query": {expr}, "time": {unix(t)}})
}

func unix(t time.Time) string {
	return strconv.FormatFloat(float64(t.UnixMilli())/1000, 'f', 3, 64)
}

func (p Prometheus) get(ctx context.Context, path string, q url.Values) ([]Series, error) {
	client := p.Client
	if client == nil {
		client = http.DefaultClient
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.URL+path+"?"+q.Encode(), nil)
	if err != nil {
		return nil, fmt.Errorf("prometheus: %w", err)
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("prometheus: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return nil, fmt.Errorf("prometheus: %w", err)
	}
	var ans struct {
		Status string `json:"status"`
		Error  string `json:"error"`
		Data   struct {
			ResultType string `json:"resultType"`
			Result     []struct {
				Metric map[string]string `json:"metric"`
				Value  []any             `json:"value"`
				Values [][]any           `json:"values"`
			} `json:"result"`
		} `json:"data"`
	}
	if err := json.Unmarshal(body, &ans); err != nil {
		return nil, fmt.Errorf("prometheus: %s: %s: %w", path, resp.Status, err)
	}
	if ans.Status != "success" {
		return nil, fmt.Errorf("prometheus: %s %q: %s", path, q.Get("query"), ans.Error)
	}
	var out []Series
	for _, r := range ans.Data.Result {
		s := Series{Labels: r.Metric}
		samples := r.Values
		if r.Value != nil {
			samples = [][]any{r.Value}
		}
		for _, v := range samples {
			pt, err := point(v)
			if err != nil {
				return nil, fmt.Errorf("prometheus: %s: %w", path, err)
			}
			s.Points = append(s.Points, pt)
		}
		out = append(out, s)
	}
	return out, nil
}

// point reads a [unix seconds, "value"] pair.
func point(v []any) (Point, error) {
	if len(v) != 2 {
		return Point{}, fmt.Errorf("sample %v", v)
	}
	ts, ok := v[0].(float64)
	str, ok2 := v[1].(string)
	if !ok || !ok2 {
		return Point{}, fmt.Errorf("sample %v", v)
	}
	x, err := strconv.ParseFloat(str, 64)
	if err != nil {
		return Point{}, fmt.Errorf("sample %v: %w", v, err)
	}
	sec, frac := math.Modf(ts)
	return Point{T: time.Unix(int64(sec), int64(frac*1e9)), V: x}, nil
}
