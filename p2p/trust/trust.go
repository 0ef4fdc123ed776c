// Package trust turns the cluster secret into what peers prove membership
// with: the keys that encrypt and authenticate gossip, and a certificate
// authority, derived from the secret alone, that signs each node's TLS
// certificate at start-up. Nodes holding the same secret derive the same CA
// and trust each other's certificates; nobody manages certificates. The peer
// port then runs TLS 1.3 with mutual authentication, and a node's identity
// is the common name of the certificate it authenticated with.
//
// The secret file holds one secret per line. The first signs this node's
// certificate and encrypts its gossip; every line is accepted from others,
// which is how a secret is rotated without downtime (see config.toml).
package trust

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
)

// MinSecretLen is the shortest secret accepted, in bytes.
const MinSecretLen = 16

var (
	// ErrNoSecret means a secret file held no secret.
	ErrNoSecret = errors.New("trust: no secret")
	// ErrUnauthenticated means a request came without a verified peer certificate.
	ErrUnauthenticated = errors.New("trust: peer not authenticated")
	// ErrNotSelf means a request names a node id other than the one it
	// authenticated as.
	ErrNotSelf = errors.New("trust: request names another node")
)

// ReadSecretFile reads the secrets of a file, one per line; blank lines and
// lines starting with # are skipped. The first is the primary.
func ReadSecretFile(path string) ([][]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("trust: cluster secret: %w", err)
	}
	return ParseSecrets(b)
}

// ParseSecrets parses the content of a secret file.
func ParseSecrets(b []byte) ([][]byte, error) {
	var out [][]byte
	sc := bufio.NewScanner(bytes.NewReader(b))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if len(line) < MinSecretLen {
			return nil, fmt.Errorf("trust: cluster secret line %d: %d bytes, want at least %d (registry-proxy secret makes one)", n, len(line), MinSecretLen)
		}
		out = append(out, []byte(line))
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("trust: cluster secret: %w", err)
	}
	if len(out) == 0 {
		return nil, ErrNoSecret
	}
	return out, nil
}

// NewSecret returns a fresh random secret, as one line of text.
func NewSecret() string {
	b := make([]byte, 32)
	rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}

func derive(secret []byte, label string, n int) []byte {
	k, err := hkdf.Key(sha256.New, secret, nil, "registry-proxy "+label+" v1", n)
	if err != nil {
		panic(err) // only for lengths beyond 255 hashes
	}
	return k
}

// GossipKeys returns memberlist's AES-256 keys, the primary first.
func GossipKeys(secrets [][]byte) [][]byte {
	keys := make([][]byte, len(secrets))
	for i, s := range secrets {
		keys[i] = derive(s, "gossip", 32)
	}
	return keys
}

// ca is the certificate authority derived from one secret. Ed25519 signs
// deterministically and the template is fixed, so every node derives the
// same certificate, byte for byte.
func ca(secret []byte) (*x509.Certificate, ed25519.PrivateKey, error) {
	key := ed25519.NewKeyFromSeed(derive(secret, "ca", ed25519.SeedSize))
	pub := key.Public().(ed25519.PublicKey)
	skid := sha256.Sum256(pub)
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "registry-proxy cluster CA " + base64.RawURLEncoding.EncodeToString(skid[:6])},
		NotBefore:             time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC),
		NotAfter:              time.Date(2200, 1, 1, 0, 0, 0, 0, time.UTC),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
		SubjectKeyId:          skid[:20],
	}
	der, err := x509.CreateCertificate(nil, tmpl, tmpl, pub, key)
	if err != nil {
		return nil, nil, fmt.Errorf("trust: cluster CA: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	return cert, key, err
}

// Identity is what a node shows its peers and checks them with.
type Identity struct {
	NodeID string
	cert   func() (*tls.Certificate, error)
	roots  *x509.CertPool
}

// NewIdentity derives the CAs of secrets and signs a fresh certificate for
// nodeID with the primary one.
func NewIdentity(secrets [][]byte, nodeID string, now time.Time) (*Identity, error) {
	if len(secrets) == 0 {
		return nil, ErrNoSecret
	}
	if nodeID == "" {
		return nil, errors.New("trust: node id required")
	}
	tmpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: nodeID},
		NotBefore:   now.Add(-time.Hour), // peers' clocks differ a little
		NotAfter:    now.AddDate(10, 0, 0),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		// Peers check the chain and the common name, not a host name; the
		// DNS name lets a standard TLS client (grpcurl -authority NODE with
		// the CAs of `registry-proxy cert`) verify which node it reached.
		DNSNames: hostNames(nodeID),
	}
	der, key, cas, err := issue(secrets, tmpl)
	if err != nil {
		return nil, fmt.Errorf("trust: node certificate: %w", err)
	}
	roots := x509.NewCertPool()
	for _, c := range cas {
		roots.AddCert(c)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	cert := &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}
	return &Identity{
		NodeID: nodeID,
		cert:   func() (*tls.Certificate, error) { return cert, nil },
		roots:  roots,
	}, nil
}

// issue signs tmpl, given a fresh serial number, for a fresh ed25519 key
// with the CA of the primary secret; cas are every secret's CA, the signer
// first.
func issue(secrets [][]byte, tmpl *x509.Certificate) (der []byte, key ed25519.PrivateKey, cas []*x509.Certificate, err error) {
	var signerKey ed25519.PrivateKey
	for i, s := range secrets {
		c, k, err := ca(s)
		if err != nil {
			return nil, nil, nil, err
		}
		cas = append(cas, c)
		if i == 0 {
			signerKey = k
		}
	}
	pub, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("key: %w", err)
	}
	if tmpl.SerialNumber, err = rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127)); err != nil {
		return nil, nil, nil, fmt.Errorf("serial: %w", err)
	}
	if der, err = x509.CreateCertificate(rand.Reader, tmpl, cas[0], pub, signerKey); err != nil {
		return nil, nil, nil, err
	}
	return der, key, cas, nil
}

// FromFiles is the identity of a node whose certificate comes from the
// operator's CA (p2p.tls: files as cert-manager writes them). The
// certificate must name nodeID (common name or a DNS name); it is read again
// whenever its files change, so a renewed certificate is used without a
// restart.
func FromFiles(caFile, certFile, keyFile, nodeID string) (*Identity, error) {
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("trust: p2p.tls.ca: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("trust: p2p.tls.ca %s: no PEM certificate", caFile)
	}
	kp := &keyPair{certFile: certFile, keyFile: keyFile}
	c, err := kp.get()
	if err != nil {
		return nil, err
	}
	if got := nodeName(c.Leaf); got != nodeID {
		return nil, fmt.Errorf("trust: p2p.tls.cert %s names node %q (its common name, else its first DNS name), not this node %q", certFile, got, nodeID)
	}
	if _, err := c.Leaf.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return nil, fmt.Errorf("trust: p2p.tls.cert %s is not from p2p.tls.ca: %w", certFile, err)
	}
	return &Identity{NodeID: nodeID, cert: kp.get, roots: roots}, nil
}

// keyPair reloads a certificate and key when their files change.
type keyPair struct {
	certFile, keyFile string

	mu      sync.Mutex
	cert    *tls.Certificate
	modTime time.Time
}

func (k *keyPair) get() (*tls.Certificate, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	ci, err1 := os.Stat(k.certFile)
	ki, err2 := os.Stat(k.keyFile)
	if err := errors.Join(err1, err2); err != nil {
		if k.cert != nil {
			return k.cert, nil // keep the last good one while files are swapped
		}
		return nil, fmt.Errorf("trust: p2p.tls: %w", err)
	}
	mod := ci.ModTime()
	if ki.ModTime().After(mod) {
		mod = ki.ModTime()
	}
	if k.cert != nil && !mod.After(k.modTime) {
		return k.cert, nil
	}
	c, err := tls.LoadX509KeyPair(k.certFile, k.keyFile)
	if err != nil {
		if k.cert != nil {
			return k.cert, nil
		}
		return nil, fmt.Errorf("trust: p2p.tls: %w", err)
	}
	k.cert, k.modTime = &c, mod
	return k.cert, nil
}

// verify checks a peer's chain against the cluster CAs.
func (id *Identity) verify(rawCerts [][]byte) error {
	if len(rawCerts) == 0 {
		return ErrUnauthenticated
	}
	leaf, err := x509.ParseCertificate(rawCerts[0])
	if err != nil {
		return fmt.Errorf("trust: peer certificate: %w", err)
	}
	inter := x509.NewCertPool()
	for _, raw := range rawCerts[1:] {
		if c, err := x509.ParseCertificate(raw); err == nil {
			inter.AddCert(c)
		}
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: id.roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return fmt.Errorf("trust: peer certificate not from this cluster: %w", err)
	}
	if nodeName(leaf) == "" {
		return fmt.Errorf("%w: certificate names no node", ErrUnauthenticated)
	}
	return nil
}

// nodeName is the node a certificate names: its common name, else its
// first DNS name.
func nodeName(c *x509.Certificate) string {
	if c.Subject.CommonName != "" {
		return c.Subject.CommonName
	}
	if len(c.DNSNames) > 0 {
		return c.DNSNames[0]
	}
	return ""
}

// ServerConfig is the peer port's TLS: a certificate from the cluster CA is
// required of every client.
func (id *Identity) ServerConfig() *tls.Config {
	return &tls.Config{
		MinVersion:     tls.VersionTLS13,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return id.cert() },
		ClientAuth:     tls.RequireAnyClientCert,
		// Chains are checked here rather than with ClientCAs, so client and
		// server check them the same way.
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error { return id.verify(raw) },
	}
}

// ClientConfig is the TLS of connections to peers. Peers are dialled by
// address, so the chain to the cluster CA is what is checked, not a host name.
func (id *Identity) ClientConfig() *tls.Config {
	return &tls.Config{
		MinVersion:           tls.VersionTLS13,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return id.cert() },
		InsecureSkipVerify:   true, // replaced by VerifyPeerCertificate below
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			if err := id.verify(raw); err != nil {
				return err
			}
			// A debugging certificate (NewClientCert) is no node: leaked,
			// it must not pass for one at that node's address.
			if leaf, err := x509.ParseCertificate(raw[0]); err != nil || isReadOnly(leaf) {
				return fmt.Errorf("%w: a read-only client certificate is not a node's", ErrUnauthenticated)
			}
			return nil
		},
	}
}

// VerifyName returns a tls.Config VerifyConnection that requires the
// peer's certificate to name node id want() (its common name, else its
// first DNS name): a node dialled as member X must be X. want is asked at
// each handshake; "" refuses.
func VerifyName(want func() string) func(tls.ConnectionState) error {
	return func(cs tls.ConnectionState) error {
		w := want()
		if w == "" {
			return fmt.Errorf("%w: no member is expected at this address", ErrUnauthenticated)
		}
		got, err := PeerID(&cs)
		if err != nil {
			return err
		}
		if got != w {
			return fmt.Errorf("%w: dialled member %q, its certificate names %q", ErrNotSelf, w, got)
		}
		return nil
	}
}

// PeerID is the node id a TLS connection state authenticated.
func PeerID(st *tls.ConnectionState) (string, error) {
	if st == nil || len(st.PeerCertificates) == 0 {
		return "", ErrUnauthenticated
	}
	return nodeName(st.PeerCertificates[0]), nil
}

// Peer is who sent a gRPC request: the node id its certificate names ("" on
// an insecure peer port) and the address it came from.
type Peer struct {
	ID string
	IP net.IP
	// ReadOnly: the certificate is one NewClientCert made for a debugging
	// client (ReadOnlyUnit), which may read but not act as its member.
	ReadOnly bool
}

// FromContext returns the gRPC caller. Without TLS (p2p.insecure) the id is empty.
func FromContext(ctx context.Context) (Peer, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return Peer{}, ErrUnauthenticated
	}
	var out Peer
	if host, _, err := net.SplitHostPort(p.Addr.String()); err == nil {
		out.IP = net.ParseIP(host)
	}
	if ti, ok := p.AuthInfo.(credentials.TLSInfo); ok {
		id, err := PeerID(&ti.State)
		if err != nil {
			return out, err
		}
		out.ID, out.ReadOnly = id, readOnly(&ti.State)
	}
	return out, nil
}

// Caller is who sent a gRPC request that names claimed as its node id: the
// id its certificate names, which the claim must match when it makes one
// (ErrNotSelf). On an insecure peer port the claim is all there is.
func Caller(ctx context.Context, claimed string) (Peer, error) {
	p, err := FromContext(ctx)
	if err != nil {
		return p, err
	}
	return claim(p, claimed)
}

// NodeHeader carries, on a piece request (HTTP), the node id its sender
// claims: on an insecure peer port the only id there is; with TLS it must
// match the certificate's when present.
const NodeHeader = "Peer-Node"

// maxNodeID bounds a node id a peer sends (a DNS name's length).
const maxNodeID = 253

// ParseNodeID checks a node id a peer sends in NodeHeader: empty (no
// claim), or 1 to 253 printable ASCII characters without spaces.
func ParseNodeID(s string) (string, error) {
	if len(s) > maxNodeID {
		return "", fmt.Errorf("%w: node id of %d bytes, at most %d", ErrUnauthenticated, len(s), maxNodeID)
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; c <= ' ' || c >= 0x7f {
			return "", fmt.Errorf("%w: node id with byte %#x", ErrUnauthenticated, c)
		}
	}
	return s, nil
}

// HTTPCaller is who sent a request to the peer port over HTTP (piece bytes):
// the id its verified TLS certificate names, else (p2p.insecure) the id
// NodeHeader claims, and the address it came from. A claim must match the
// certificate (ErrNotSelf).
func HTTPCaller(r *http.Request) (Peer, error) {
	var out Peer
	if host, _, err := net.SplitHostPort(r.RemoteAddr); err == nil {
		out.IP = net.ParseIP(host)
	}
	claimed, err := ParseNodeID(r.Header.Get(NodeHeader))
	if err != nil {
		return out, err
	}
	if r.TLS != nil {
		id, err := PeerID(r.TLS)
		if err != nil {
			return out, err
		}
		out.ID, out.ReadOnly = id, readOnly(r.TLS)
	}
	return claim(out, claimed)
}

// claim checks the id a request claims against the one p authenticated.
func claim(p Peer, claimed string) (Peer, error) {
	switch {
	case p.ID == "":
		p.ID = claimed
	case claimed != "" && claimed != p.ID:
		return p, fmt.Errorf("%w: host_id %q, authenticated as %q", ErrNotSelf, claimed, p.ID)
	}
	return p, nil
}
