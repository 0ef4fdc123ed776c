package trust

import (
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"
)

// ReadOnlyUnit is the organizational unit that marks a certificate made by
// NewClientCert. Nodes answer such a certificate's reads (SyncHost,
// WatchPieces, piece bytes, health, reflection) and refuse what would act
// as its member (Register, Announce, Preheat, the manifest and tag calls);
// a node dialling a peer refuses it as the peer's certificate.
const ReadOnlyUnit = "registry-proxy read-only"

// MaxClientCertValidity is the longest a debugging certificate may live.
const MaxClientCertValidity = 24 * time.Hour

// clientCertSkew backdates a debugging certificate: the machine that makes
// it and the nodes' clocks differ a little.
const clientCertSkew = 5 * time.Minute

// ClientCert is a debugging client's certificate, its key and the cluster
// CAs (to verify the nodes with), in PEM.
type ClientCert struct {
	Cert, Key, CA []byte
	NotAfter      time.Time
}

// NewClientCert signs a client certificate for node name with the CA of
// the primary secret, as NewIdentity signs a node's, so the peer port of
// any node holding one of secrets accepts it; CA holds every secret's CA.
//
// It must name a live member and be used from that member's address (the
// peer port's rule), and it reads what that member reads, private blobs
// included. Nothing can revoke it short of rotating the secret: hence a
// life of valid, at most MaxClientCertValidity, from now.
func NewClientCert(secrets [][]byte, name string, now time.Time, valid time.Duration) (*ClientCert, error) {
	if len(secrets) == 0 {
		return nil, ErrNoSecret
	}
	if name == "" {
		return nil, errors.New("trust: client certificate: a node name is required")
	}
	if _, err := ParseNodeID(name); err != nil {
		return nil, fmt.Errorf("trust: client certificate: %w", err)
	}
	if valid <= 0 || valid > MaxClientCertValidity {
		return nil, fmt.Errorf("trust: client certificate: validity %v, want more than 0 and at most %v", valid, MaxClientCertValidity)
	}
	tmpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: name, OrganizationalUnit: []string{ReadOnlyUnit}},
		NotBefore:   now.Add(-clientCertSkew),
		NotAfter:    now.Add(valid),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, key, cas, err := issue(secrets, tmpl)
	if err != nil {
		return nil, fmt.Errorf("trust: client certificate: %w", err)
	}
	var caPEM []byte
	for _, c := range cas {
		caPEM = append(caPEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("trust: client key: %w", err)
	}
	return &ClientCert{
		Cert:     pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		Key:      pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
		CA:       caPEM,
		NotAfter: tmpl.NotAfter,
	}, nil
}

// readOnly tells whether a connection's peer authenticated with a
// certificate NewClientCert made.
func readOnly(st *tls.ConnectionState) bool {
	return len(st.PeerCertificates) > 0 && isReadOnly(st.PeerCertificates[0])
}

func isReadOnly(c *x509.Certificate) bool {
	return slices.Contains(c.Subject.OrganizationalUnit, ReadOnlyUnit)
}

// hostNames is nodeID as a certificate's DNS names when it is a host name
// (a Kubernetes node name is), else none.
func hostNames(nodeID string) []string {
	if len(nodeID) > 253 {
		return nil
	}
	for _, label := range strings.Split(nodeID, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return nil
		}
		for _, c := range label {
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-') {
				return nil
			}
		}
	}
	return []string{nodeID}
}
