package statesync

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"net"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"

	"github.com/registry-proxy/registry-proxy/p2p/pb"
	"github.com/registry-proxy/registry-proxy/p2p/trust"
)

// authStream is a server stream whose caller authenticated with cert.
type authStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s authStream) Context() context.Context { return s.ctx }

// A debugging client subscribing under a member's name (a read-only
// certificate, registry-proxy cert) holds a subscription of its own: the
// member's stays; a second debugging subscription replaces the first.
func TestReadOnlySubscriberKeepsMembers(t *testing.T) {
	srv := NewServer(ServerOptions{
		Self:     func() *pb.Host { return &pb.Host{Id: "p1", Addr: "p1", State: &pb.HostState{}} },
		Interval: 10 * time.Millisecond,
	})
	// The caller's certificate names c1; metadata "read-only" makes it a
	// debugging one (as the TLS of the peer port would show it).
	gs := grpc.NewServer(grpc.StreamInterceptor(func(s any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
		subject := pkix.Name{CommonName: "c1"}
		if md, _ := metadata.FromIncomingContext(ss.Context()); len(md.Get("read-only")) > 0 {
			subject.OrganizationalUnit = []string{trust.ReadOnlyUnit}
		}
		st := tls.ConnectionState{PeerCertificates: []*x509.Certificate{{Subject: subject}}}
		p, _ := peer.FromContext(ss.Context())
		ctx := peer.NewContext(ss.Context(), &peer.Peer{Addr: p.Addr, AuthInfo: credentials.TLSInfo{State: st}})
		return h(s, authStream{ss, ctx})
	}))
	pb.RegisterHostSyncServer(gs, srv)
	lis := bufconn.Listen(1 << 20)
	go gs.Serve(lis)
	t.Cleanup(gs.Stop)
	cc, err := grpc.NewClient("passthrough:///p1",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	c := pb.NewHostSyncClient(cc)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	subscribe := func(readOnly bool) pb.HostSync_SyncHostClient {
		t.Helper()
		sctx := ctx
		if readOnly {
			sctx = metadata.AppendToOutgoingContext(ctx, "read-only", "1")
		}
		st, err := c.SyncHost(sctx, &pb.SyncHostRequest{HostId: "c1", PeerId: "p1"})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := st.Recv(); err != nil { // subscribed
			t.Fatal(err)
		}
		return st
	}
	member := subscribe(false)
	debug1 := subscribe(true)
	if n := srv.Subscribers(); n != 2 {
		t.Fatalf("%d subscribers after the debugging one, want the member's and its own", n)
	}
	debug2 := subscribe(true)
	for {
		_, err := debug1.Recv()
		if err != nil {
			if status.Code(err) != codes.Aborted {
				t.Fatalf("the first debugging subscription ended with %v, want Aborted", err)
			}
			break
		}
	}
	for i := 0; i < 3; i++ {
		if _, err := member.Recv(); err != nil {
			t.Fatalf("the member's subscription: %v", err)
		}
		if _, err := debug2.Recv(); err != nil {
			t.Fatalf("the second debugging subscription: %v", err)
		}
	}
	if n := srv.Subscribers(); n != 2 {
		t.Fatalf("%d subscribers, want 2", n)
	}
}
