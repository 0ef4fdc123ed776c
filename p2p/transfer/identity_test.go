package transfer

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/registry-proxy/registry-proxy/p2p/pb"
	"github.com/registry-proxy/registry-proxy/p2p/peer"
	"github.com/registry-proxy/registry-proxy/p2p/trust"
	"github.com/registry-proxy/registry-proxy/piece"
)

type oneBlob struct{ data []byte }

func (s oneBlob) Snapshot(context.Context, digest.Digest) (peer.Snapshot, <-chan struct{}, bool) {
	return peer.Snapshot{Plan: piece.PlanFor(int64(len(s.data))), Done: []bool{true}, CRC: []uint32{1}, Complete: true}, nil, true
}

func (s oneBlob) OpenPiece(context.Context, digest.Digest, int) (io.ReadSeeker, int64, int64, func(), error) {
	return strings.NewReader(string(s.data)), 0, int64(len(s.data)), func() {}, nil
}

// servePeer runs a peer server for node id on loopback with the cluster's TLS.
func servePeer(t *testing.T, secrets [][]byte, id string, data []byte) string {
	t.Helper()
	ident, err := trust.NewIdentity(secrets, id, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := peer.NewServer(peer.Options{Source: oneBlob{data}, TLS: ident.ServerConfig(), HostSync: pb.UnimplementedHostSyncServer{}, Tracker: pb.UnimplementedTrackerServer{}})
	go s.Serve(ln)
	t.Cleanup(func() { s.Close() })
	return ln.Addr().String()
}

// A node dialled as member X must present X's certificate: for piece bytes
// and for gRPC; and Answered reports which peer ports answered.
func TestDialVerifiesMember(t *testing.T) {
	secrets := [][]byte{[]byte("0123456789abcdef-secret")}
	data := []byte("piece")
	addrA := servePeer(t, secrets, "node-a", data)
	tarpit, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer tarpit.Close()
	go func() {
		for {
			c, err := tarpit.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()
	self, err := trust.NewIdentity(secrets, "node-self", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	// node-c claims node-a's address: a node that is not node-c answers.
	memberAt := map[string]string{addrA: "node-a", tarpit.Addr().String(): "node-t"}
	p := NewPool(Options{TLS: self.ClientConfig(), NodeID: "node-self", MemberAt: func(a string) string { return memberAt[a] }})
	defer p.Close()
	d := digest.FromBytes(data)

	for _, tt := range []struct {
		id, addr string
		ok       bool
	}{{"node-a", addrA, true}, {"node-c", addrA, false}} {
		body, err := p.Parent(tt.id, tt.addr, d).Fetch(t.Context(), 0, 0, int64(len(data)))
		if (err == nil) != tt.ok || (err != nil && !errors.Is(err, trust.ErrNotSelf)) {
			t.Errorf("piece from %s at %s: %v", tt.id, tt.addr, err)
		}
		if body != nil {
			body.Close()
		}
	}
	// gRPC: the address's member is checked at the handshake.
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Second)
	_, err = p.Register(ctx, addrA, &pb.RegisterRequest{Digest: d.String()})
	cancel()
	if status.Code(err) != codes.Unimplemented {
		t.Errorf("Register at node-a's address: %v, want its server's answer", err)
	}
	memberAt[addrA] = "node-c" // the pool asks at each handshake
	p2 := NewPool(Options{TLS: self.ClientConfig(), MemberAt: func(a string) string { return memberAt[a] }})
	defer p2.Close()
	ctx, cancel = context.WithTimeout(t.Context(), 3*time.Second)
	_, err = p2.Register(ctx, addrA, &pb.RegisterRequest{Digest: d.String()})
	cancel()
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "node-c") {
		t.Errorf("Register at node-a's address dialled as node-c: %v", err)
	}
	memberAt[addrA] = "node-a"

	// Answered: the real port answers, the tarpit does not, and waits are
	// bounded.
	start := time.Now()
	got := p.Answered([]string{addrA, tarpit.Addr().String()})
	if !got[0] || got[1] || time.Since(start) > time.Second {
		t.Errorf("Answered = %v after %v", got, time.Since(start))
	}
	start = time.Now()
	if got := p.Answered([]string{tarpit.Addr().String()}); got[0] || time.Since(start) > 50*time.Millisecond {
		t.Errorf("tarpit asked again: %v after %v (a slow first probe is waited for once)", got, time.Since(start))
	}
}
