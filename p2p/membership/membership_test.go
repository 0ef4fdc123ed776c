package membership

import (
	"context"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/registry-proxy/registry-proxy/internal/ports"
)

func freePeerAddr(t *testing.T) string {
	t.Helper()
	a, err := ports.FreePair("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func TestGossipAddr(t *testing.T) {
	tests := []struct{ in, want string }{
		{"127.0.0.1:7000", "127.0.0.1:7001"},
		{"[::1]:80", "[::1]:81"},
	}
	for _, tt := range tests {
		if got, err := GossipAddr(tt.in); err != nil || got != tt.want {
			t.Errorf("GossipAddr(%q) = %q, %v", tt.in, got, err)
		}
	}
	for _, bad := range []string{"nohost", "h:0", "h:65535", "h:x"} {
		if _, err := GossipAddr(bad); err == nil {
			t.Errorf("GossipAddr(%q) accepted", bad)
		}
	}
}

func TestJoinStaticAndDNS(t *testing.T) {
	a := freePeerAddr(t)
	ma, err := Start(context.Background(), Options{NodeID: "a", PeerAddr: a})
	if err != nil {
		t.Fatal(err)
	}
	defer ma.Close()
	b := freePeerAddr(t)
	mb, err := Start(context.Background(), Options{NodeID: "b", PeerAddr: b, Join: []string{a}})
	if err != nil {
		t.Fatal(err)
	}
	_, port, _ := net.SplitHostPort(a)
	c := freePeerAddr(t)
	mc, err := Start(context.Background(), Options{
		NodeID: "c", PeerAddr: c, Join: []string{"dns:peers.test.invalid:" + port},
		Resolve: func(_ context.Context, host string) ([]string, error) {
			if host != "peers.test.invalid" {
				return nil, fmt.Errorf("unexpected %s", host)
			}
			return []string{"127.0.0.1"}, nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer mc.Close()
	deadline := time.Now().Add(10 * time.Second)
	for len(ma.Members()) != 3 || len(mc.Members()) != 3 {
		if time.Now().After(deadline) {
			t.Fatalf("members a=%v c=%v", ma.Members(), mc.Members())
		}
		time.Sleep(50 * time.Millisecond)
	}
	got := ma.Members()
	want := []Member{{"a", a}, {"b", b}, {"c", c}}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("members %v, want %v", got, want)
		}
	}
	// b leaves: the others see it go.
	mb.Close()
	deadline = time.Now().Add(15 * time.Second)
	for len(ma.Members()) != 2 {
		if time.Now().After(deadline) {
			t.Fatalf("b still a member: %v", ma.Members())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// A node whose seed starts after it (a rollout starts every node at once)
// joins as soon as the seed is up: it retries fast while alone, well before
// the Rejoin period it settles on once joined.
func TestJoinRetriesFastWhileAlone(t *testing.T) {
	a := freePeerAddr(t)
	b := freePeerAddr(t)
	mb, err := Start(context.Background(), Options{NodeID: "b", PeerAddr: b, Join: []string{a}, Rejoin: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	defer mb.Close()
	if n := len(mb.Members()); n != 1 {
		t.Fatalf("b sees %d members before its seed exists", n)
	}
	// The seed comes up after b's first try failed; it does not join b.
	ma, err := Start(context.Background(), Options{NodeID: "a", PeerAddr: a, Rejoin: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	defer ma.Close()
	up := time.Now()
	deadline := up.Add(30 * time.Second) // half the Rejoin period
	for len(mb.Members()) != 2 {
		if time.Now().After(deadline) {
			t.Fatalf("b did not join its seed within %v of it starting", time.Since(up))
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("b joined %v after its seed started", time.Since(up).Round(time.Millisecond))
}
