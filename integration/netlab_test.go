package integration

import (
	"context"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/registry-proxy/registry-proxy/internal/netlab"
)

// The lab's hosts reach each other and the root namespace, and nothing of
// the lab is left after Close.
func TestNetlab(t *testing.T) {
	ctx, lab := newLab(t)
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

// newLab makes a lab for a test of at most two minutes; the test closes it.
func newLab(t *testing.T) (context.Context, *netlab.Lab) {
	t.Helper()
	needRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	lab, err := netlab.New(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return ctx, lab
}

// A socket made in Host.Do is the host's: it binds the host's address, which
// the root namespace does not have, and the other hosts reach it.
func TestNetlabDo(t *testing.T) {
	ctx, lab := newLab(t)
	defer lab.Close()
	h1, err := lab.AddHost(ctx, 1, netlab.Limits{})
	if err != nil {
		t.Fatal(err)
	}
	h2, err := lab.AddHost(ctx, 2, netlab.Limits{})
	if err != nil {
		t.Fatal(err)
	}
	addr := net.JoinHostPort(h1.IP, "7100")
	if l, err := net.Listen("tcp", addr); err == nil {
		l.Close()
		t.Fatalf("the root namespace could listen on host 1's %s", addr)
	}
	var l net.Listener
	if err := h1.Do(func() (err error) { l, err = net.Listen("tcp", addr); return err }); err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	var c net.Conn
	if err := h2.Do(func() (err error) { c, err = net.Dial("tcp", addr); return err }); err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if got := s.RemoteAddr().(*net.TCPAddr).IP.String(); got != h2.IP {
		t.Fatalf("connection from %s, want host 2's %s", got, h2.IP)
	}
	// This goroutine's thread is back in the root namespace.
	if l2, err := net.Listen("tcp", addr); err == nil {
		l2.Close()
		t.Fatal("after Do, the root namespace could listen on host 1's address")
	}
}
