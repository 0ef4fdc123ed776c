package trust

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"net"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
)

func secretsOf(ss ...string) [][]byte {
	var out [][]byte
	for _, s := range ss {
		out = append(out, []byte(s))
	}
	return out
}

// debugClient is the TLS a standard client (grpcurl) builds from the
// files of `registry-proxy cert`: the key pair, the CAs as roots, and the
// node it expects as the server name.
func debugClient(t *testing.T, c *ClientCert, serverName string) *tls.Config {
	t.Helper()
	kp, err := tls.X509KeyPair(c.Cert, c.Key)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(c.CA) {
		t.Fatal("no CA in ca.pem")
	}
	return &tls.Config{Certificates: []tls.Certificate{kp}, RootCAs: roots, ServerName: serverName, MinVersion: tls.VersionTLS13}
}

func TestClientCert(t *testing.T) {
	const a, b, c = "secret-aaaaaaaaaaaaaaaa", "secret-bbbbbbbbbbbbbbbb", "secret-cccccccccccccccc"
	now := time.Now()
	tests := []struct {
		name           string
		client, server []string
		made           time.Time // the clock NewClientCert is given
		valid          time.Duration
		ok             bool
	}{
		{"same secret", []string{a}, []string{a}, now, time.Hour, true},
		{"other secret", []string{c}, []string{a}, now, time.Hour, false},
		{"rotation: new primary, server still on the old one first", []string{b, a}, []string{a, b}, now, time.Hour, true},
		{"rotation: new primary, server not rotated yet", []string{b, a}, []string{a}, now, time.Hour, false},
		{"expired after --valid", []string{a}, []string{a}, now.Add(-61 * time.Minute), time.Hour, false},
		{"short-lived, still valid", []string{a}, []string{a}, now.Add(-50 * time.Minute), time.Hour, true},
		{"made with a clock 4 min ahead", []string{a}, []string{a}, now.Add(4 * time.Minute), time.Hour, true},
		{"made with a clock 10 min ahead", []string{a}, []string{a}, now.Add(10 * time.Minute), time.Hour, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cert, err := NewClientCert(secretsOf(tt.client...), "node-client", tt.made, tt.valid)
			if err != nil {
				t.Fatal(err)
			}
			if want := tt.made.Add(tt.valid); !cert.NotAfter.Equal(want) {
				t.Errorf("NotAfter %v, want %v", cert.NotAfter, want)
			}
			sv := identity(t, "node-server", tt.server...)
			cfg := debugClient(t, cert, "node-server")
			if !tt.ok {
				// The refusal is the server's (the certificate), not the
				// client's: it would trust the server with the server's CA.
				cfg.InsecureSkipVerify = true
			}
			clientSaw, serverSaw, err := handshake(t, cfg, sv.ServerConfig())
			if tt.ok {
				if err != nil || clientSaw != "node-server" || serverSaw != "node-client" {
					t.Fatalf("handshake: client saw %q, server saw %q, err %v", clientSaw, serverSaw, err)
				}
				return
			}
			if err == nil {
				t.Fatalf("server accepted the certificate (it saw %q)", serverSaw)
			}
		})
	}
}

// The ca.pem of a client certificate verifies the node by its name, as a
// standard client (grpcurl -authority NODE) does; another name fails.
func TestClientCertVerifiesServerName(t *testing.T) {
	secret := "secret-aaaaaaaaaaaaaaaa"
	cert, err := NewClientCert(secretsOf(secret), "node-client", time.Now(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	sv := identity(t, "node-server.example", secret)
	if _, _, err := handshake(t, debugClient(t, cert, "node-server.example"), sv.ServerConfig()); err != nil {
		t.Fatalf("the node's own name: %v", err)
	}
	if _, _, err := handshake(t, debugClient(t, cert, "node-other"), sv.ServerConfig()); err == nil {
		t.Fatal("a client expecting another node accepted this one")
	}
	other := identity(t, "node-server.example", "secret-cccccccccccccccc")
	if _, _, err := handshake(t, debugClient(t, cert, "node-server.example"), other.ServerConfig()); err == nil {
		t.Fatal("a node of another cluster passed the client's ca.pem")
	}
}

// The certificate is marked read-only, and the mark reaches the server's
// view of the caller (gRPC and HTTP).
func TestClientCertReadOnly(t *testing.T) {
	cert, err := NewClientCert(secretsOf("secret-aaaaaaaaaaaaaaaa"), "node-a", time.Now(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(cert.Cert)
	leaf, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(leaf.Subject.OrganizationalUnit, ReadOnlyUnit) || leaf.Subject.CommonName != "node-a" {
		t.Fatalf("subject %v", leaf.Subject)
	}
	if !slices.Equal(leaf.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}) {
		t.Errorf("extended key usage %v, want client only", leaf.ExtKeyUsage)
	}
	node := identity(t, "node-a", "secret-aaaaaaaaaaaaaaaa")
	nodeLeaf := node.mustLeaf(t)
	addr := &net.TCPAddr{IP: net.ParseIP("127.0.0.2"), Port: 4000}
	for _, tt := range []struct {
		name string
		cert *x509.Certificate
		ro   bool
	}{{"debugging certificate", leaf, true}, {"node certificate", nodeLeaf, false}} {
		st := tls.ConnectionState{PeerCertificates: []*x509.Certificate{tt.cert}}
		ctx := peer.NewContext(context.Background(), &peer.Peer{Addr: addr, AuthInfo: credentials.TLSInfo{State: st}})
		p, err := Caller(ctx, "node-a")
		if err != nil || p.ID != "node-a" || p.ReadOnly != tt.ro {
			t.Errorf("%s: Caller = %+v, %v; want read-only %v", tt.name, p, err, tt.ro)
		}
		r := httptest.NewRequest("GET", "/pieces/x/0", nil)
		r.TLS, r.RemoteAddr = &st, "127.0.0.2:4000"
		if p, err := HTTPCaller(r); err != nil || p.ReadOnly != tt.ro {
			t.Errorf("%s: HTTPCaller = %+v, %v; want read-only %v", tt.name, p, err, tt.ro)
		}
	}
}

func (id *Identity) mustLeaf(t *testing.T) *x509.Certificate {
	t.Helper()
	c, err := id.cert()
	if err != nil {
		t.Fatal(err)
	}
	return c.Leaf
}

// A leaked debugging certificate cannot pass for a node: a node dialling a
// peer refuses it as the peer's certificate.
func TestClientCertIsNoServer(t *testing.T) {
	secret := "secret-aaaaaaaaaaaaaaaa"
	cert, err := NewClientCert(secretsOf(secret), "node-b", time.Now(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	kp, err := tls.X509KeyPair(cert.Cert, cert.Key)
	if err != nil {
		t.Fatal(err)
	}
	fake := &tls.Config{Certificates: []tls.Certificate{kp}, MinVersion: tls.VersionTLS13, ClientAuth: tls.RequireAnyClientCert}
	node := identity(t, "node-a", secret)
	cfg := node.ClientConfig()
	cfg.VerifyConnection = VerifyName(func() string { return "node-b" })
	if _, _, err := handshake(t, cfg, fake); err == nil || !strings.Contains(err.Error(), "read-only") {
		t.Fatalf("a node accepted a read-only certificate as a peer's: %v", err)
	}
}

func TestClientCertValidates(t *testing.T) {
	s := secretsOf("secret-aaaaaaaaaaaaaaaa")
	for _, tt := range []struct {
		name    string
		secrets [][]byte
		node    string
		valid   time.Duration
		want    string
	}{
		{"no secret", nil, "node-a", time.Hour, "no secret"},
		{"no name", s, "", time.Hour, "name is required"},
		{"name with a space", s, "node a", time.Hour, "node id"},
		{"zero validity", s, "node-a", 0, "validity"},
		{"negative validity", s, "node-a", -time.Minute, "validity"},
		{"over 24h", s, "node-a", 24*time.Hour + time.Second, "validity"},
		{"24h", s, "node-a", 24 * time.Hour, ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := NewClientCert(tt.secrets, tt.node, time.Now(), tt.valid)
			if tt.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err %v, want %q", err, tt.want)
			}
		})
	}
}

func TestHostNames(t *testing.T) {
	for _, tt := range []struct {
		id   string
		want bool
	}{
		{"node-a", true},
		{"ip-10-0-1-2.eu-west-1.compute.internal", true},
		{"Node-A", true},
		{"node_a", false},
		{"-node", false},
		{"node.", false},
		{"a..b", false},
		{"10.0.0.1:7946", false},
		{strings.Repeat("a", 64), false},
	} {
		if got := hostNames(tt.id); (len(got) == 1) != tt.want {
			t.Errorf("hostNames(%q) = %v, want a DNS name: %v", tt.id, got, tt.want)
		}
	}
}
