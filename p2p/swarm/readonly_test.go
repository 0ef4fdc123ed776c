package swarm

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"net"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/registry-proxy/registry-proxy/p2p/pb"
	"github.com/registry-proxy/registry-proxy/p2p/trust"
)

// A read-only certificate (registry-proxy cert) for a live member's name,
// from that member's address, reads (Member: pieces, WatchPieces,
// SyncHost) but does not act as the member (Caller: Register, Announce,
// Preheat, manifests); the member's own certificate does both.
func TestReadOnlyCertificate(t *testing.T) {
	s := newRegisterSwarm(t)
	ctxOf := func(units ...string) context.Context {
		st := tls.ConnectionState{PeerCertificates: []*x509.Certificate{{Subject: pkix.Name{CommonName: "child", OrganizationalUnit: units}}}}
		return peer.NewContext(context.Background(), &peer.Peer{Addr: &net.TCPAddr{IP: net.ParseIP("127.0.0.2"), Port: 40000}, AuthInfo: credentials.TLSInfo{State: st}})
	}
	for _, tt := range []struct {
		name     string
		ctx      context.Context
		readOnly bool
	}{
		{"member's certificate", ctxOf(), false},
		{"read-only certificate", ctxOf(trust.ReadOnlyUnit), true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			p, err := trust.FromContext(tt.ctx)
			if err != nil || p.ReadOnly != tt.readOnly {
				t.Fatalf("FromContext = %+v, %v", p, err)
			}
			if err := s.Member(p); err != nil {
				t.Errorf("Member (reads): %v", err)
			}
			_, err = s.Caller(tt.ctx, "child")
			if got := status.Code(err); tt.readOnly != (got == codes.PermissionDenied) || (!tt.readOnly && err != nil) {
				t.Errorf("Caller: %v", err)
			}
			_, err = s.Announce(tt.ctx, &pb.AnnounceRequest{HostId: "child"})
			if got := status.Code(err); tt.readOnly != (got == codes.PermissionDenied) || (!tt.readOnly && err != nil) {
				t.Errorf("Announce: %v", err)
			}
			_, err = s.Register(tt.ctx, &pb.RegisterRequest{Digest: testDigest, HostId: "child", Registry: "reg.test", Repository: "r/x"})
			if got := status.Code(err); tt.readOnly != (got == codes.PermissionDenied) {
				t.Errorf("Register: %v", err)
			}
		})
	}
}
