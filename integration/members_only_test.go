package integration

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"sort"
	"strconv"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/registry-proxy/registry-proxy/internal/ports"
	"github.com/registry-proxy/registry-proxy/internal/testregistry"
	"github.com/registry-proxy/registry-proxy/p2p/membership"
	"github.com/registry-proxy/registry-proxy/p2p/pb"
	"github.com/registry-proxy/registry-proxy/p2p/trust"
	"github.com/registry-proxy/registry-proxy/piece"
)

// mintIdentity is a certificate for id minted from the cluster secret by
// whoever holds it.
func mintIdentity(t testing.TB, secret, id string) *trust.Identity {
	t.Helper()
	secrets, err := trust.ReadSecretFile(secret)
	if err != nil {
		t.Fatal(err)
	}
	ident, err := trust.NewIdentity(secrets, id, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return ident
}

// fromIP dials from a given loopback address.
func fromIP(ip string) func(ctx context.Context, network, addr string) (net.Conn, error) {
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}, Timeout: 5 * time.Second}
	return d.DialContext
}

// The peer port answers pieces, WatchPieces and SyncHost only to live
// members, under their certificate's name and from their gossiped address:
// a holder of the secret with a certificate of its own gets nothing, nor
// does a member's name from another address.
func TestPeerPortMembersOnly(t *testing.T) {
	c := startCluster(t, 2)
	const size = 8 << 20
	blob := testregistry.RandomBytes(size, 41)
	d, err := c.reg.PushBlob(context.Background(), "cluster/blob", blob)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := fetchVerified(c.url(0, "cluster/blob", d), d); err != nil {
		t.Fatal(err)
	}
	firstPiece := blob[:piece.PlanFor(size).PieceSize]
	pieceURL := "https://" + c.peers[0] + "/pieces/" + d + "/0"

	tests := []struct {
		name string
		id   string // the name the certificate was minted for
		from string // the source address
		ok   bool
	}{
		{"secret holder, unknown name", "outsider", "127.0.0.1", false},
		{"secret holder, unknown name, another address", "outsider", "127.0.0.2", false},
		{"a member's name from another address", c.ids[1], "127.0.0.2", false},
		{"a member's name from its address", c.ids[1], "127.0.0.1", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			ident := mintIdentity(t, c.secret, tt.id)

			// Piece bytes.
			client := &http.Client{Transport: &http.Transport{DialContext: fromIP(tt.from), TLSClientConfig: ident.ClientConfig()}}
			defer client.CloseIdleConnections()
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, pieceURL, nil)
			resp, err := client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			leaked := 0
			if len(body) >= 64 && bytes.Contains(firstPiece, body[:64]) {
				leaked = len(body)
			}
			t.Logf("piece: status %d, %d bytes of the blob", resp.StatusCode, leaked)
			if tt.ok {
				if resp.StatusCode != http.StatusOK || !bytes.Equal(body, firstPiece) {
					t.Fatalf("a member got status %d, %d bytes", resp.StatusCode, len(body))
				}
			} else if resp.StatusCode != http.StatusForbidden || leaked != 0 {
				t.Fatalf("piece: status %d, %d bytes of the blob; want 403 and none", resp.StatusCode, leaked)
			}

			cc, err := grpc.NewClient("passthrough:///"+c.peers[0],
				grpc.WithTransportCredentials(credentials.NewTLS(ident.ClientConfig())),
				grpc.WithContextDialer(func(ctx context.Context, a string) (net.Conn, error) { return fromIP(tt.from)(ctx, "tcp", a) }))
			if err != nil {
				t.Fatal(err)
			}
			defer cc.Close()

			// WatchPieces: the piece map.
			wctx, wcancel := context.WithTimeout(ctx, 5*time.Second)
			defer wcancel()
			st, err := pb.NewPiecesClient(cc).WatchPieces(wctx, &pb.WatchPiecesRequest{Digest: d, HostId: tt.id})
			var up *pb.PieceUpdate
			if err == nil {
				up, err = st.Recv()
			}
			t.Logf("WatchPieces: %d pieces, %v", len(up.GetPieces()), err)
			if tt.ok != (err == nil) || (!tt.ok && (status.Code(err) != codes.PermissionDenied || up != nil)) {
				t.Fatalf("WatchPieces: %v, update %v", err, up)
			}

			// SyncHost: a place among the subscribers.
			sctx, scancel := context.WithTimeout(ctx, 5*time.Second)
			defer scancel()
			hs, err := pb.NewHostSyncClient(cc).SyncHost(sctx, &pb.SyncHostRequest{HostId: tt.id})
			var host *pb.Host
			if err == nil {
				host, err = hs.Recv()
			}
			t.Logf("SyncHost: %v", err)
			if tt.ok != (err == nil) || (!tt.ok && (status.Code(err) != codes.PermissionDenied || host != nil)) {
				t.Fatalf("SyncHost: %v, host %v", err, host)
			}
		})
	}

	// SyncHost under invented names does not fill the subscribers.
	ident := mintIdentity(t, c.secret, "outsider")
	cc, err := grpc.NewClient("passthrough:///"+c.peers[0], grpc.WithTransportCredentials(credentials.NewTLS(ident.ClientConfig())))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	for i := range 60 {
		other := mintIdentity(t, c.secret, "invented-"+strconv.Itoa(i))
		cc2, err := grpc.NewClient("passthrough:///"+c.peers[0], grpc.WithTransportCredentials(credentials.NewTLS(other.ClientConfig())))
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		hs, err := pb.NewHostSyncClient(cc2).SyncHost(ctx, &pb.SyncHostRequest{HostId: "invented-" + strconv.Itoa(i)})
		if err == nil {
			_, err = hs.Recv()
		}
		cancel()
		cc2.Close()
		if status.Code(err) != codes.PermissionDenied {
			t.Fatalf("SyncHost as invented-%d: %v", i, err)
		}
	}
}

// tarpit accepts connections and never answers.
func tarpit(t testing.TB, addr string) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		var held []net.Conn
		defer func() {
			for _, c := range held {
				c.Close()
			}
		}()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			held = append(held, c)
		}
	}()
}

type fakeMeta string

func (m fakeMeta) NodeMeta(limit int) []byte                { return []byte(m) }
func (fakeMeta) NotifyMsg([]byte)                           {}
func (fakeMeta) GetBroadcasts(overhead, limit int) [][]byte { return nil }
func (fakeMeta) LocalState(join bool) []byte                { return nil }
func (fakeMeta) MergeRemoteState(buf []byte, join bool)     {}

// fakeMember gossips with the cluster's keys as id, advertising peerAddr
// (its gossip port - 1, as membership binds it), where nothing answers.
func fakeMember(t testing.TB, secret, id, peerAddr, join string) {
	t.Helper()
	secrets, err := trust.ReadSecretFile(secret)
	if err != nil {
		t.Fatal(err)
	}
	keys := trust.GossipKeys(secrets)
	g, err := membership.GossipAddr(peerAddr)
	if err != nil {
		t.Fatal(err)
	}
	host, port, _ := net.SplitHostPort(g)
	p, _ := strconv.Atoi(port)
	cfg := memberlist.DefaultLANConfig()
	cfg.Name = id
	cfg.BindAddr, cfg.BindPort = host, p
	cfg.AdvertiseAddr, cfg.AdvertisePort = host, p
	cfg.Delegate = fakeMeta(peerAddr)
	cfg.Logger = log.New(io.Discard, "", 0)
	if cfg.Keyring, err = memberlist.NewKeyring(keys, keys[0]); err != nil {
		t.Fatal(err)
	}
	cfg.GossipVerifyIncoming, cfg.GossipVerifyOutgoing = true, true
	ml, err := memberlist.Create(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ml.Shutdown() })
	jg, _ := membership.GossipAddr(join)
	if _, err := ml.Join([]string{jg}); err != nil {
		t.Fatal(err)
	}
}

// Members whose peer port never answers (30 gossiping members advertising
// a tarpit each) are ranked as no owner: a 2 MiB pull takes about as long
// with them as without.
func TestFakeMembersDoNotSlowPulls(t *testing.T) {
	c := startCluster(t, 3)
	const size = 2 << 20
	pull := func(seed uint64, via int) time.Duration {
		d := pushBlob(t, c.reg, size, seed)
		start := time.Now()
		if _, err := fetchVerified(c.url(via, "cluster/blob", d), d); err != nil {
			t.Fatal(err)
		}
		return time.Since(start)
	}
	measure := func(base uint64) (median, total time.Duration) {
		var ds []time.Duration
		for i := range 9 {
			dt := pull(base+uint64(i), i%3)
			ds = append(ds, dt)
			total += dt
		}
		sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
		return ds[len(ds)/2], total
	}
	pull(1000, 0) // warm up connections
	without, withoutTotal := measure(2000)

	const fakes = 30
	for i := range fakes {
		pa, err := ports.FreePair("127.0.0.1")
		if err != nil {
			t.Fatal(err)
		}
		tarpit(t, pa)
		fakeMember(t, c.secret, fmt.Sprintf("fake-%02d", i), pa, c.peers[i%3])
	}
	c.waitMembers(t, 3+fakes)
	// Let the nodes' first probes of the fakes time out.
	time.Sleep(3 * time.Second)
	with, withTotal := measure(3000)
	t.Logf("2 MiB pull, median of 9: %v without fake members, %v with %d (total %v, %v)", without, with, fakes, withoutTotal, withTotal)
	// Pulls on loopback take milliseconds: 1.2× plus 50 ms of noise.
	if with > without*12/10+50*time.Millisecond {
		t.Errorf("with %d fake members a pull took %v, without %v", fakes, with, without)
	}
}

func mustSecrets(t testing.TB, file string) [][]byte {
	t.Helper()
	s, err := trust.ReadSecretFile(file)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// With p2p.insecure the id a piece request claims (trust.NodeHeader) and
// its source address must still be a live member's.
func TestInsecurePeerPortMembersOnly(t *testing.T) {
	reg := startRegistry(t)
	const size = 2 << 20
	d := pushBlob(t, reg, size, 43)
	c := newCluster(t, reg, []string{"node-a", "node-b"})
	c.secret = ""
	for i := range c.ids {
		c.nodes = append(c.nodes, c.startNode(t, i, "--config", writeTOML(t, "[p2p]\ninsecure = true\n")))
	}
	c.waitMembers(t, 2)
	if _, err := fetchVerified(c.url(0, "cluster/blob", d), d); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name, id, from string
		code           int
	}{
		{"no id", "", "127.0.0.1", http.StatusForbidden},
		{"unknown id", "outsider", "127.0.0.1", http.StatusForbidden},
		{"a member's id from another address", c.ids[1], "127.0.0.2", http.StatusForbidden},
		{"a member's id from its address", c.ids[1], "127.0.0.1", http.StatusOK},
	} {
		client := &http.Client{Transport: &http.Transport{DialContext: fromIP(tt.from)}}
		req, _ := http.NewRequest(http.MethodGet, "http://"+c.peers[0]+"/pieces/"+d+"/0", nil)
		if tt.id != "" {
			req.Header.Set(trust.NodeHeader, tt.id)
		}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		client.CloseIdleConnections()
		t.Logf("%s: status %d, %d bytes", tt.name, resp.StatusCode, len(body))
		if resp.StatusCode != tt.code || (tt.code != http.StatusOK && len(body) > 512) {
			t.Errorf("%s: status %d, %d bytes; want %d", tt.name, resp.StatusCode, len(body), tt.code)
		}
	}
	// The nodes still send each other pieces: their requests name them.
	if _, err := fetchVerified(c.url(1, "cluster/blob", d), d); err != nil {
		t.Fatal(err)
	}
	if n := peerBytes(stats(t, c.nodes[1], d)); n != size {
		t.Errorf("node-b took %d bytes from peers, want %d", n, size)
	}
}
