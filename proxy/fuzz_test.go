package proxy_test

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/registry-proxy/registry-proxy/blobstore"
	"github.com/registry-proxy/registry-proxy/p2p/collector"
	"github.com/registry-proxy/registry-proxy/proxy"
	"github.com/registry-proxy/registry-proxy/proxy/upstream"
	"github.com/registry-proxy/registry-proxy/task"
)

// FuzzRequest sends arbitrary paths, queries and Range headers to the mirror
// (whose upstream refuses connections): no panic, no 500, and every error
// under /v2/ is an OCI error body.
func FuzzRequest(f *testing.F) {
	st, err := blobstore.Open(context.Background(), f.TempDir(), blobstore.Options{})
	if err != nil {
		f.Fatal(err)
	}
	up, _ := upstream.New(upstream.Options{Registries: map[string]string{"docker.io": "http://127.0.0.1:9"}, Attempts: 1})
	tasks := task.NewManager(task.Options{
		Store:  st,
		Sizer:  task.UpstreamSizer{Upstream: up},
		Filler: task.UpstreamFiller{Collector: collector.New(collector.Options{Attempts: 1}), Upstream: up},
	})
	f.Cleanup(tasks.Close)
	h := proxy.New(proxy.Options{Upstream: up, Store: st, Tasks: tasks, UpstreamTimeout: time.Second}).Handler()
	for _, s := range []string{
		"/v2/", "/v2/library/alpine/manifests/latest", "/v2/a/b/blobs/sha256:" + strings.Repeat("0", 64),
		"/v2/A/blobs/x", "/v2/a/manifests/sha256:zz", "/v2/a/blobs/uploads/", "/v2/../etc", "/debug/blobs/x",
	} {
		f.Add("GET", s, "ns=docker.io", "bytes=0-10")
	}
	f.Fuzz(func(t *testing.T, method, path, query, rng string) {
		if !strings.HasPrefix(path, "/") || strings.ContainsAny(path, " \r\n") || strings.ContainsAny(method, " \r\n/") || method == "" || method == "CONNECT" {
			return
		}
		u := &url.URL{Path: path, RawQuery: url.QueryEscape(query)}
		req, err := http.NewRequest(method, u.String(), nil)
		if err != nil {
			return
		}
		req.Header.Set("Range", rng)
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		if w.Code >= 500 && w.Code != http.StatusBadGateway && w.Code != http.StatusGatewayTimeout {
			t.Fatalf("%s %s: status %d", method, path, w.Code)
		}
		if w.Code >= 400 && w.Code != 416 && strings.HasPrefix(req.URL.Path, "/v2/") {
			var body struct{ Errors []struct{ Code string } }
			if err := json.Unmarshal(w.Body.Bytes(), &body); err != nil || len(body.Errors) == 0 || body.Errors[0].Code == "" {
				t.Fatalf("%s %s: status %d without an OCI error body: %q", method, path, w.Code, w.Body.String())
			}
		}
	})
}
