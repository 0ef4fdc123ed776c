package transfer

import (
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/internal/conntest"
	"github.com/registry-proxy/registry-proxy/p2p/collector"
)

// TestFetch maps each answer of a peer's piece endpoint, and keeps the
// connection after a refusal: a closed one would cost the next piece a new
// connection (a TLS handshake between nodes).
func TestFetch(t *testing.T) {
	srv := conntest.New(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case strings.HasSuffix(r.URL.Path, "/0"):
			_, _ = io.WriteString(w, "abcd")
		case strings.HasSuffix(r.URL.Path, "/1"):
			http.Error(w, "upload slots full", http.StatusServiceUnavailable)
		case strings.HasSuffix(r.URL.Path, "/2"):
			http.Error(w, "sent elsewhere", http.StatusConflict)
		case strings.HasSuffix(r.URL.Path, "/3"):
			http.Error(w, "no such piece", http.StatusNotFound)
		case strings.HasSuffix(r.URL.Path, "/4"):
			_, _ = io.WriteString(w, "abc")
		}
	}))
	defer srv.Close()
	p := NewPool(Options{})
	defer p.Close()
	parent := p.Parent("node-b", strings.TrimPrefix(srv.URL, "http://"), digest.FromString("blob"))
	for _, tc := range []struct {
		piece   int
		want    error
		wantErr string
	}{
		{1, collector.ErrBusy, ""},
		{2, collector.ErrElsewhere, ""},
		{3, nil, "404 Not Found"},
		{0, nil, ""},
		{4, nil, "3 bytes, want 4"},
	} {
		body, err := parent.Fetch(t.Context(), tc.piece, 0, 4)
		switch {
		case tc.want != nil && !errors.Is(err, tc.want):
			t.Errorf("piece %d: %v, want %v", tc.piece, err, tc.want)
		case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
			t.Errorf("piece %d: %v, want %q", tc.piece, err, tc.wantErr)
		case tc.want == nil && tc.wantErr == "":
			if err != nil {
				t.Fatalf("piece %d: %v", tc.piece, err)
			}
			b, err := io.ReadAll(body)
			body.Close()
			if err != nil || string(b) != "abcd" {
				t.Errorf("piece %d: %q, %v", tc.piece, b, err)
			}
		}
	}
	// One connection for the refusals and the piece; the short piece is
	// not read and closes its own.
	if n := srv.Conns(); n != 1 {
		t.Errorf("%d connections for one piece after three refusals, want 1", n)
	}
}
