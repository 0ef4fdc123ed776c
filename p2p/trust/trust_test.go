package trust

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
)

// handshake runs a TLS handshake between a client and a server config over
// loopback TCP and returns the id each side authenticated.
func handshake(t *testing.T, client, server *tls.Config) (clientSaw, serverSaw string, err error) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type result struct {
		id  string
		err error
	}
	srv := make(chan result, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			srv <- result{err: err}
			return
		}
		defer conn.Close()
		s := tls.Server(conn, server)
		s.SetDeadline(time.Now().Add(5 * time.Second))
		var r result
		if r.err = s.Handshake(); r.err == nil {
			st := s.ConnectionState()
			r.id, r.err = PeerID(&st)
			s.Write([]byte("x")) // the client reads this: the server accepted it
		}
		srv <- r
	}()
	conn, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := tls.Client(conn, client)
	c.SetDeadline(time.Now().Add(5 * time.Second))
	cerr := c.Handshake()
	if cerr == nil {
		st := c.ConnectionState()
		clientSaw, _ = PeerID(&st)
		// TLS 1.3: the server checks the client's certificate after the
		// client has finished; the read sees a refusal.
		_, cerr = c.Read(make([]byte, 1))
	}
	r := <-srv
	return clientSaw, r.id, errors.Join(cerr, r.err)
}

func identity(t *testing.T, id string, secrets ...string) *Identity {
	t.Helper()
	var ss [][]byte
	for _, s := range secrets {
		ss = append(ss, []byte(s))
	}
	ident, err := NewIdentity(ss, id, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return ident
}

func TestMutualTLS(t *testing.T) {
	const a, b, c = "secret-aaaaaaaaaaaaaaaa", "secret-bbbbbbbbbbbbbbbb", "secret-cccccccccccccccc"
	tests := []struct {
		name           string
		client, server []string
		ok             bool
	}{
		{"same secret", []string{a}, []string{a}, true},
		{"other secret", []string{c}, []string{a}, false},
		{"rotation step 1 meets old", []string{a, b}, []string{a}, true},
		{"rotation step 2 meets step 1", []string{b, a}, []string{a, b}, true},
		{"rotation step 1 meets step 2", []string{a, b}, []string{b, a}, true},
		{"rotation done meets step 2", []string{b}, []string{b, a}, true},
		{"rotation done meets old", []string{b}, []string{a}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cl := identity(t, "node-client", tt.client...)
			sv := identity(t, "node-server", tt.server...)
			clientSaw, serverSaw, err := handshake(t, cl.ClientConfig(), sv.ServerConfig())
			if tt.ok {
				if err != nil || clientSaw != "node-server" || serverSaw != "node-client" {
					t.Fatalf("handshake: client saw %q, server saw %q, err %v", clientSaw, serverSaw, err)
				}
				return
			}
			if err == nil {
				t.Fatal("handshake between different clusters succeeded")
			}
		})
	}
}

func TestClientWithoutCertificateRefused(t *testing.T) {
	sv := identity(t, "node-server", "secret-aaaaaaaaaaaaaaaa")
	_, _, err := handshake(t, &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13}, sv.ServerConfig())
	if err == nil {
		t.Fatal("a client without a certificate was accepted")
	}
}

func TestDerivedCADeterministic(t *testing.T) {
	c1, _, err := ca([]byte("secret-aaaaaaaaaaaaaaaa"))
	if err != nil {
		t.Fatal(err)
	}
	c2, _, _ := ca([]byte("secret-aaaaaaaaaaaaaaaa"))
	if string(c1.Raw) != string(c2.Raw) {
		t.Fatal("the CA derived from one secret differs between derivations")
	}
	k1 := GossipKeys([][]byte{[]byte("secret-aaaaaaaaaaaaaaaa"), []byte("secret-bbbbbbbbbbbbbbbb")})
	if len(k1) != 2 || len(k1[0]) != 32 || string(k1[0]) == string(k1[1]) {
		t.Fatalf("gossip keys %x", k1)
	}
}

func TestParseSecrets(t *testing.T) {
	tests := []struct {
		in   string
		n    int
		want string
	}{
		{"abcdefghijklmnopqrstuvwxyz\n", 1, ""},
		{"# comment\n\n  abcdefghijklmnopqrstuvwxyz  \nzyxwvutsrqponmlkjihgfedcba\n", 2, ""},
		{"short\n", 0, "at least"},
		{"\n# only comments\n", 0, "no secret"},
	}
	for _, tt := range tests {
		got, err := ParseSecrets([]byte(tt.in))
		if tt.want != "" {
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("ParseSecrets(%q) = %v, want error %q", tt.in, err, tt.want)
			}
			continue
		}
		if err != nil || len(got) != tt.n {
			t.Errorf("ParseSecrets(%q) = %d secrets, %v", tt.in, len(got), err)
		}
	}
	if s := NewSecret(); len(s) < MinSecretLen {
		t.Errorf("NewSecret %q too short", s)
	}
}

func FuzzParseSecrets(f *testing.F) {
	f.Add([]byte("abcdefghijklmnopqrstuvwxyz\n"))
	f.Add([]byte("#x\n\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		ss, err := ParseSecrets(b)
		if err == nil && len(ss) == 0 {
			t.Fatal("no error and no secret")
		}
		for _, s := range ss {
			if len(s) < MinSecretLen {
				t.Fatalf("short secret %q accepted", s)
			}
		}
	})
}

// operatorCA writes a CA and a certificate for each node into dir, as
// cert-manager would, and returns the CA file.
func operatorCA(t *testing.T, dir string, nodes ...string) string {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "operator CA"}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, _ := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	caCert, _ := x509.ParseCertificate(caDER)
	write := func(name string, typ string, der []byte) {
		if err := os.WriteFile(filepath.Join(dir, name), pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("ca.crt", "CERTIFICATE", caDER)
	for i, n := range nodes {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(int64(i + 2)), Subject: pkix.Name{CommonName: n}, NotBefore: time.Now().Add(-time.Hour),
			NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth}}
		der, _ := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
		kder, _ := x509.MarshalECPrivateKey(key)
		write(n+".crt", "CERTIFICATE", der)
		write(n+".key", "EC PRIVATE KEY", kder)
	}
	return filepath.Join(dir, "ca.crt")
}

func TestOperatorCertificates(t *testing.T) {
	dir := t.TempDir()
	ca := operatorCA(t, dir, "node-a", "node-b")
	other := operatorCA(t, t.TempDir(), "node-c")
	load := func(caFile, node, certDir string) *Identity {
		id, err := FromFiles(caFile, filepath.Join(certDir, node+".crt"), filepath.Join(certDir, node+".key"), node)
		if err != nil {
			t.Fatal(err)
		}
		return id
	}
	a, b := load(ca, "node-a", dir), load(ca, "node-b", dir)
	if c, s, err := handshake(t, a.ClientConfig(), b.ServerConfig()); err != nil || c != "node-b" || s != "node-a" {
		t.Fatalf("same operator CA: %q %q %v", c, s, err)
	}
	c := load(other, "node-c", filepath.Dir(other))
	if _, _, err := handshake(t, c.ClientConfig(), b.ServerConfig()); err == nil {
		t.Fatal("a certificate of another CA was accepted")
	}
	secret := identity(t, "node-d", "secret-aaaaaaaaaaaaaaaa")
	if _, _, err := handshake(t, secret.ClientConfig(), b.ServerConfig()); err == nil {
		t.Fatal("a secret-derived certificate was accepted by an operator-CA node")
	}
	// A certificate that names another node is refused at start-up.
	if _, err := FromFiles(ca, filepath.Join(dir, "node-a.crt"), filepath.Join(dir, "node-a.key"), "node-b"); err == nil || !strings.Contains(err.Error(), "not this node") {
		t.Fatalf("certificate for another node: %v", err)
	}
}

func TestCaller(t *testing.T) {
	addr := &net.TCPAddr{IP: net.ParseIP("127.0.0.2"), Port: 4000}
	tlsCtx := func(id string) context.Context {
		st := tls.ConnectionState{PeerCertificates: []*x509.Certificate{{Subject: pkix.Name{CommonName: id}}}}
		return peer.NewContext(context.Background(), &peer.Peer{Addr: addr, AuthInfo: credentials.TLSInfo{State: st}})
	}
	plain := peer.NewContext(context.Background(), &peer.Peer{Addr: addr})
	tests := []struct {
		name    string
		ctx     context.Context
		claimed string
		id      string
		err     error
	}{
		{"tls, claims itself", tlsCtx("node-a"), "node-a", "node-a", nil},
		{"tls, claims nothing", tlsCtx("node-a"), "", "node-a", nil},
		{"tls, claims another", tlsCtx("node-a"), "node-b", "", ErrNotSelf},
		{"insecure, the claim", plain, "node-b", "node-b", nil},
		{"no peer", context.Background(), "node-a", "", ErrUnauthenticated},
	}
	for _, tt := range tests {
		p, err := Caller(tt.ctx, tt.claimed)
		if !errors.Is(err, tt.err) || (err == nil && (p.ID != tt.id || !p.IP.Equal(addr.IP))) {
			t.Errorf("%s: Caller = %+v, %v", tt.name, p, err)
		}
	}
}
