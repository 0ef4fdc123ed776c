package inspect

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/registry-proxy/registry-proxy/p2p/pb"
	"github.com/registry-proxy/registry-proxy/task"
)

func TestWritePeers(t *testing.T) {
	var b strings.Builder
	err := WritePeers(&b, []Member{
		{ID: "slow", Addr: "10.0.0.3:5002", Followed: true, State: &pb.HostState{TxBandwidth: 1e6, MaxTxBandwidth: 2e6, UploadsInFlight: 3, UploadLimit: 16}, StateAge: 1.2, Weight: 1e6},
		{ID: "me", Addr: "10.0.0.1:5002", Self: true},
		{ID: "fast", Addr: "10.0.0.2:5002", Followed: true, State: &pb.HostState{MaxTxBandwidth: 125e6, UploadLimit: 16, FreeBytes: 5e9}, Weight: 125e6},
		{ID: "new", Addr: "10.0.0.4:5002", Weight: 6.25e6},
	})
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(b.String()), "\n")
	var order []string
	for _, l := range lines[1:] {
		order = append(order, strings.Fields(l)[0])
	}
	// Self first, then by weight.
	if got := strings.Join(order, ","); got != "me,fast,new,slow" {
		t.Errorf("order %s:\n%s", got, b.String())
	}
	for _, want := range []string{"me (self)", "3/16", "5GB", "no state", "125MB/s"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("no %q in:\n%s", want, b.String())
		}
	}
}

func TestWriteStatus(t *testing.T) {
	for _, tc := range []struct {
		name  string
		tasks []task.Stats
		want  []string
	}{
		{"idle", nil, []string{"no downloads in flight"}},
		{"one", []task.Stats{{Digest: "sha256:0123456789abcdef0123", Registry: "docker.io", Repo: "library/nginx", Size: 100 << 20,
			Sources: map[string]int64{"upstream": 25 << 20, "node-a": 25 << 20}, Duration: 2 * time.Second}},
			[]string{"sha256:0123456789ab ", "docker.io/library/nginx", " 50.0%", "[##########..........]", "26.21MB", "1 "}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var b strings.Builder
			if err := WriteStatus(&b, tc.tasks, "upstream"); err != nil {
				t.Fatal(err)
			}
			for _, w := range tc.want {
				if !strings.Contains(b.String(), w) {
					t.Errorf("no %q in:\n%s", w, b.String())
				}
			}
		})
	}
}

func TestClient(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/debug/members":
			json.NewEncoder(w).Encode([]Member{{ID: "a", Self: true}})
		default:
			http.Error(w, "nope", http.StatusServiceUnavailable)
		}
	}))
	defer srv.Close()
	c := Client{Base: srv.URL}
	ms, err := c.Members(context.Background())
	if err != nil || len(ms) != 1 || ms[0].ID != "a" {
		t.Errorf("members: %v %v", ms, err)
	}
	if _, err := c.Tasks(context.Background()); err == nil || !strings.Contains(err.Error(), "503") {
		t.Errorf("tasks from a failing endpoint: %v", err)
	}
}

func TestWatchOnce(t *testing.T) {
	var b strings.Builder
	calls := 0
	err := Watch(context.Background(), &b, time.Hour, true, func(w io.Writer) error {
		calls++
		_, err := io.WriteString(w, "frame\n")
		return err
	})
	if err != nil || calls != 1 || b.String() != "frame\n" {
		t.Errorf("once: %d calls, %q, %v", calls, b.String(), err)
	}
	// Refreshing: frames until the context ends, each after a clear.
	ctx, cancel := context.WithCancel(context.Background())
	b.Reset()
	calls = 0
	err = Watch(ctx, &b, time.Millisecond, false, func(w io.Writer) error {
		calls++
		if calls == 3 {
			cancel()
		}
		return nil
	})
	if err != nil || calls != 3 || strings.Count(b.String(), "\x1b[H\x1b[2J") != 3 {
		t.Errorf("refreshing: %d calls, %q, %v", calls, b.String(), err)
	}
}
