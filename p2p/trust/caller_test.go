package trust

import (
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func TestHTTPCaller(t *testing.T) {
	withTLS := func(id string) *tls.ConnectionState {
		return &tls.ConnectionState{PeerCertificates: []*x509.Certificate{{Subject: pkix.Name{CommonName: id}}}}
	}
	tests := []struct {
		name   string
		tls    *tls.ConnectionState
		header string
		remote string
		id     string
		err    error
	}{
		{"tls, no claim", withTLS("node-a"), "", "127.0.0.2:4000", "node-a", nil},
		{"tls, claims itself", withTLS("node-a"), "node-a", "127.0.0.2:4000", "node-a", nil},
		{"tls, claims another", withTLS("node-a"), "node-b", "127.0.0.2:4000", "", ErrNotSelf},
		{"tls without a certificate", &tls.ConnectionState{}, "node-a", "127.0.0.2:4000", "", ErrUnauthenticated},
		{"insecure, the claim", nil, "node-b", "127.0.0.2:4000", "node-b", nil},
		{"insecure, no claim", nil, "", "127.0.0.2:4000", "", nil},
		{"bad claim", nil, "node a", "127.0.0.2:4000", "", ErrUnauthenticated},
		{"long claim", withTLS("node-a"), strings.Repeat("a", 254), "127.0.0.2:4000", "", ErrUnauthenticated},
		{"control byte", nil, "node\x01", "127.0.0.2:4000", "", ErrUnauthenticated},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := httptest.NewRequest(http.MethodGet, "/pieces/x/0", nil)
			r.TLS, r.RemoteAddr = tt.tls, tt.remote
			if tt.header != "" {
				r.Header.Set(NodeHeader, tt.header)
			}
			p, err := HTTPCaller(r)
			if !errors.Is(err, tt.err) {
				t.Fatalf("err = %v, want %v", err, tt.err)
			}
			if err == nil && (p.ID != tt.id || !p.IP.Equal(net.ParseIP("127.0.0.2"))) {
				t.Fatalf("caller = %+v, want %q from 127.0.0.2", p, tt.id)
			}
		})
	}
}

func FuzzParseNodeID(f *testing.F) {
	for _, s := range []string{"", "node-a", "a b", "\x00", strings.Repeat("x", 300), "ノード"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		id, err := ParseNodeID(s)
		if err != nil {
			if !errors.Is(err, ErrUnauthenticated) {
				t.Fatalf("error %v is not ErrUnauthenticated", err)
			}
			return
		}
		if id != s || len(id) > maxNodeID || strings.ContainsFunc(id, func(r rune) bool { return r <= ' ' || r >= 0x7f }) {
			t.Fatalf("ParseNodeID(%q) = %q accepted", s, id)
		}
		// What passes is a valid header value and survives the trip.
		r, _ := http.NewRequest(http.MethodGet, "http://x/", nil)
		r.Header.Set(NodeHeader, s)
		if got, _ := ParseNodeID(r.Header.Get(NodeHeader)); got != s {
			t.Fatalf("header round trip %q -> %q", s, got)
		}
	})
}

func TestVerifyName(t *testing.T) {
	secret := [][]byte{[]byte("0123456789abcdef0123")}
	srvID, err := NewIdentity(secret, "node-a", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	cliID, err := NewIdentity(secret, "node-b", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		want string
		err  error
	}{{"node-a", nil}, {"node-c", ErrNotSelf}, {"", ErrUnauthenticated}} {
		cfg := cliID.ClientConfig()
		want := tt.want
		cfg.VerifyConnection = VerifyName(func() string { return want })
		_, _, err := handshake(t, cfg, srvID.ServerConfig())
		if (err == nil) != (tt.err == nil) || (err != nil && !errors.Is(err, tt.err) && !strings.Contains(err.Error(), tt.err.Error())) {
			t.Errorf("dialling as %q: %v, want %v", tt.want, err, tt.err)
		}
	}
}
