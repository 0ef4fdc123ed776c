package peer

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
	"google.golang.org/grpc/codes"
	grpcpeer "google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/registry-proxy/registry-proxy/p2p/pb"
	"github.com/registry-proxy/registry-proxy/p2p/trust"
	"github.com/registry-proxy/registry-proxy/piece"
)

// members admits the ids it holds, each from its IP.
type members map[string]string

func (m members) Member(p trust.Peer) error {
	ip, ok := m[p.ID]
	if !ok || !net.ParseIP(ip).Equal(p.IP) {
		return errors.New("not a member here")
	}
	return nil
}

type pieceSource struct{ data []byte }

func (s pieceSource) Snapshot(context.Context, digest.Digest) (Snapshot, <-chan struct{}, bool) {
	plan := piece.PlanFor(int64(len(s.data)))
	return Snapshot{Plan: plan, Done: []bool{true}, CRC: []uint32{1}, Complete: true}, nil, true
}

func (s pieceSource) OpenPiece(context.Context, digest.Digest, int) (io.ReadSeeker, int64, int64, func(), error) {
	return strings.NewReader(string(s.data)), 0, int64(len(s.data)), func() {}, nil
}

type hostSyncFunc struct {
	pb.UnimplementedHostSyncServer
	called *bool
}

func (h hostSyncFunc) SyncHost(*pb.SyncHostRequest, pb.HostSync_SyncHostServer) error {
	*h.called = true
	return nil
}

type syncStream struct {
	pb.HostSync_SyncHostServer
	ctx context.Context
}

func (s syncStream) Context() context.Context { return s.ctx }

// Pieces, WatchPieces and SyncHost answer only Auth's members, under the
// id they claim on an insecure port, from their address.
func TestMembersOnly(t *testing.T) {
	auth := members{"node-a": "127.0.0.2"}
	data := []byte("piece bytes")
	tests := []struct {
		name   string
		id     string
		remote string
		code   int
	}{
		{"member from its address", "node-a", "127.0.0.2:5000", http.StatusOK},
		{"member from another address", "node-a", "127.0.0.3:5000", http.StatusForbidden},
		{"unknown id", "node-x", "127.0.0.2:5000", http.StatusForbidden},
		{"no id", "", "127.0.0.2:5000", http.StatusForbidden},
		{"malformed id", "node a", "127.0.0.2:5000", http.StatusUnauthorized},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var synced bool
			s := NewServer(Options{Source: pieceSource{data}, Auth: auth, HostSync: hostSyncFunc{called: &synced}})
			r := httptest.NewRequest(http.MethodGet, "/pieces/"+digest.FromBytes(data).String()+"/0", nil)
			r.RemoteAddr = tt.remote
			if tt.id != "" {
				r.Header.Set(trust.NodeHeader, tt.id)
			}
			w := httptest.NewRecorder()
			s.http.Handler.ServeHTTP(w, r)
			if w.Code != tt.code || (tt.code != http.StatusOK && strings.Contains(w.Body.String(), string(data))) {
				t.Fatalf("piece: %d %q, want %d", w.Code, w.Body.String(), tt.code)
			}

			ip, port, _ := net.SplitHostPort(tt.remote)
			ctx := grpcpeer.NewContext(context.Background(), &grpcpeer.Peer{Addr: &net.TCPAddr{IP: net.ParseIP(ip), Port: atoi(port)}})
			st := &fakeStream{ctx: ctx, sent: make(chan *pb.PieceUpdate, 4)}
			err := s.WatchPieces(&pb.WatchPiecesRequest{Digest: digest.FromBytes(data).String(), HostId: tt.id}, st)
			if ok := tt.code == http.StatusOK; ok != (err == nil) || (!ok && (status.Code(err) != codes.PermissionDenied || len(st.sent) > 0)) {
				t.Fatalf("WatchPieces: %v, %d updates", err, len(st.sent))
			}
			err = hostSync{s.opts.HostSync, auth}.SyncHost(&pb.SyncHostRequest{HostId: tt.id}, syncStream{ctx: ctx})
			if ok := tt.code == http.StatusOK; ok != (err == nil) || ok != synced {
				t.Fatalf("SyncHost: %v, reached the server %v", err, synced)
			}
		})
	}
}

func atoi(s string) int {
	n := 0
	for _, c := range s {
		n = n*10 + int(c-'0')
	}
	return n
}
