package integration

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/registry-proxy/registry-proxy/internal/netlab"
)

// The lab's hosts reach each other and the root namespace, and nothing of
// the lab is left after Close.
func TestNetlab(t *testing.T) {
	needRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	lab, err := netlab.New(ctx)
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	defer func() {
		if !closed {
			lab.Close()
		}
	}()
	h1, err := lab.AddHost(ctx, 1, netlab.Limits{Up: 10e6, Down: 10e6})
	if err != nil {
		t.Fatal(err)
	}
	h2, err := lab.AddHost(ctx, 2, netlab.Limits{Up: 5e6})
	if err != nil {
		t.Fatal(err)
	}
	srv := h1.Command(ctx, *proxyBin, "serve", "--listen", h1.IP+":5000", "--data-dir", t.TempDir())
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { srv.Process.Kill(); srv.Wait() }()
	url := "http://" + h1.IP + ":5000/healthz"
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := http.Get(url) // from the root namespace, through the bridge
		if err == nil {
			resp.Body.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("root namespace cannot reach %s: %v", url, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	out, err := h2.Command(ctx, "curl", "-sS", "--max-time", "10", url).CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "ok" {
		t.Fatalf("host 2 -> host 1: %v %s", err, out)
	}
	srv.Process.Kill()
	srv.Wait()
	if err := lab.Close(); err != nil {
		t.Fatal(err)
	}
	closed = true
	left, err := netlab.Leftovers(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range left {
		if strings.Contains(l, lab.ID) {
			t.Errorf("left behind: %s", l)
		}
	}
}
