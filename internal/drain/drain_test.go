package drain

import (
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/registry-proxy/registry-proxy/internal/conntest"
)

// TestCloseKeepsConnection: short bodies drained and closed leave one
// connection for every request; a body longer than Limit closes its own.
func TestCloseKeepsConnection(t *testing.T) {
	srv := conntest.New(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/long" {
			_, _ = io.WriteString(w, strings.Repeat("x", 4*Limit))
			return
		}
		http.Error(w, "busy", http.StatusServiceUnavailable)
	}))
	defer srv.Close()
	get := func(path string) {
		resp, err := srv.Client().Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		Close(resp.Body)
	}
	for range 3 {
		get("/short")
	}
	if n := srv.Conns(); n != 1 {
		t.Errorf("%d connections for three short answers, want 1", n)
	}
	get("/long")
	get("/short")
	if n := srv.Conns(); n != 2 {
		t.Errorf("%d connections after a long answer, want 2", n)
	}
}
