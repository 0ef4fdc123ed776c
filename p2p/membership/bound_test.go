package membership

import (
	"errors"
	"net"
	"strconv"
	"testing"
)

func TestBound(t *testing.T) {
	ip := net.ParseIP("10.0.0.5")
	tests := []struct {
		peer string
		ip   net.IP
		port uint16
		ok   bool
	}{
		{"10.0.0.5:7000", ip, 7001, true},
		{"[::1]:7000", net.ParseIP("::1"), 7001, true},
		{"10.0.0.6:7000", ip, 7001, false},   // another host
		{"127.0.0.1:19999", ip, 7001, false}, // a tarpit elsewhere
		{"10.0.0.5:7002", ip, 7001, false},   // another port on the same host: another member's
		{"10.0.0.5:7001", ip, 7001, false},
		{"node-a:7000", ip, 7001, false}, // names are not bound
		{"10.0.0.5", ip, 7001, false},
		{"", ip, 7001, false},
		{"10.0.0.5:65535", ip, 0, false},
	}
	for _, tt := range tests {
		err := Bound(tt.peer, tt.ip, tt.port)
		if (err == nil) != tt.ok || (err != nil && !errors.Is(err, ErrUnbound)) {
			t.Errorf("Bound(%q, %s, %d) = %v, want ok %v", tt.peer, tt.ip, tt.port, err, tt.ok)
		}
	}
}

func FuzzBound(f *testing.F) {
	f.Add("10.0.0.5:7000", "10.0.0.5", uint16(7001))
	f.Add("[::1]:1", "::1", uint16(2))
	f.Fuzz(func(t *testing.T, peer, ip string, port uint16) {
		if Bound(peer, net.ParseIP(ip), port) != nil {
			return
		}
		host, _, err := net.SplitHostPort(peer)
		if err != nil || !net.ParseIP(host).Equal(net.ParseIP(ip)) {
			t.Fatalf("Bound accepted %q from %s", peer, ip)
		}
		if g, err := GossipAddr(peer); err != nil || g != net.JoinHostPort(host, strconv.Itoa(int(port))) {
			t.Fatalf("Bound accepted %q gossiping from port %d (%q)", peer, port, g)
		}
	})
}
