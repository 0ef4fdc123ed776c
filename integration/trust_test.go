package integration

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/registry-proxy/registry-proxy/internal/ports"
	"github.com/registry-proxy/registry-proxy/internal/probe"
	"github.com/registry-proxy/registry-proxy/internal/testregistry"
	"github.com/registry-proxy/registry-proxy/p2p/owner"
	"github.com/registry-proxy/registry-proxy/p2p/pb"
	"github.com/registry-proxy/registry-proxy/p2p/trust"
	"github.com/registry-proxy/registry-proxy/piece"
)

// waitOutput waits until a process has logged s.
func waitOutput(t *testing.T, p *proc, s string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !strings.Contains(p.output(), s) {
		if time.Now().After(deadline) {
			t.Fatalf("no %q in the log within %v", s, timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// A host without the cluster secret gets nothing from the peer port: not
// piece bytes (plain HTTP, TLS without a certificate, TLS with a certificate
// from another secret), not gRPC; a member with the secret does.
func TestPeerPortRefusesOutsiders(t *testing.T) {
	c := startCluster(t, 2)
	const size = 8 << 20
	d := pushBlob(t, c.reg, size, 31)
	if _, err := fetchVerified(c.url(0, "cluster/blob", d), d); err != nil {
		t.Fatal(err)
	}
	pieceURL := "://" + c.peers[0] + "/pieces/" + d + "/0"
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	get := func(client *http.Client, url string) (int, []byte, error) {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		resp, err := client.Do(req)
		if err != nil {
			return 0, nil, err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		return resp.StatusCode, b, err
	}
	tlsClient := func(cfg *tls.Config) *http.Client {
		return &http.Client{Transport: &http.Transport{TLSClientConfig: cfg}}
	}
	other := writeSecret(t)
	outsider := func(secret string) *trust.Identity {
		secrets, err := trust.ReadSecretFile(secret)
		if err != nil {
			t.Fatal(err)
		}
		id, err := trust.NewIdentity(secrets, "outsider", time.Now())
		if err != nil {
			t.Fatal(err)
		}
		return id
	}

	// Plain HTTP: the TLS port answers with a 400 and no content.
	if code, body, err := get(http.DefaultClient, "http"+pieceURL); err == nil && code == http.StatusOK {
		t.Errorf("plain HTTP got a piece: %d, %d bytes", code, len(body))
	}
	// TLS, no client certificate.
	if code, _, err := get(tlsClient(&tls.Config{InsecureSkipVerify: true}), "https"+pieceURL); err == nil {
		t.Errorf("TLS without a certificate got status %d", code)
	} else {
		t.Logf("TLS without a certificate: %v", err)
	}
	// TLS with a certificate of another cluster.
	if code, _, err := get(tlsClient(outsider(other).ClientConfig()), "https"+pieceURL); err == nil {
		t.Errorf("a certificate from another secret got status %d", code)
	} else {
		t.Logf("another secret: %v", err)
	}
	// gRPC, plaintext and with another secret.
	for name, creds := range map[string]credentials.TransportCredentials{
		"plaintext":      insecure.NewCredentials(),
		"another secret": credentials.NewTLS(outsider(other).ClientConfig()),
	} {
		cc, err := grpc.NewClient("passthrough:///"+c.peers[0], grpc.WithTransportCredentials(creds))
		if err != nil {
			t.Fatal(err)
		}
		rctx, rcancel := context.WithTimeout(ctx, 5*time.Second)
		_, err = pb.NewTrackerClient(cc).Register(rctx, &pb.RegisterRequest{Digest: d, HostId: "outsider", Addr: "127.0.0.1:9", Registry: clusterRegistry, Repository: "cluster/blob"})
		rcancel()
		cc.Close()
		if err == nil {
			t.Errorf("Register over %s accepted", name)
		} else {
			t.Logf("Register over %s: %v", name, err)
		}
	}
	// A holder of the secret that is no member gets nothing (issue 34).
	if code, body, err := get(tlsClient(outsider(c.secret).ClientConfig()), "https"+pieceURL); err != nil || code != http.StatusForbidden {
		t.Errorf("a non-member with the secret: status %d, %d bytes, %v", code, len(body), err)
	}
	// A member with the secret gets the piece.
	member, err := trust.NewIdentity(mustSecrets(t, c.secret), c.ids[1], time.Now())
	if err != nil {
		t.Fatal(err)
	}
	code, body, err := get(tlsClient(member.ClientConfig()), "https"+pieceURL)
	if err != nil || code != http.StatusOK || int64(len(body)) != piece.PlanFor(size).PieceSize {
		t.Fatalf("a member's piece request: status %d, %d bytes, %v", code, len(body), err)
	}
}

// A node with another secret cannot join: its gossip is not understood, and
// neither side counts the other as a member.
func TestGossipRefusesOtherSecret(t *testing.T) {
	c := startCluster(t, 2)
	pa, err := ports.FreePair("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	intruder := startProxy(t, "", "--upstream", clusterRegistry+"="+c.reg.URL, "--node-id", "node-intruder",
		"--peer-listen", pa, "--cluster-secret", writeSecret(t), "--join", c.peers[0])
	waitOutput(t, intruder.proc, "join found nobody yet", 30*time.Second)
	ctx := context.Background()
	for _, p := range []*proxy{c.nodes[0], c.nodes[1]} {
		if n, err := probe.Members(ctx, "http://"+p.Admin); err != nil || n != 2 {
			t.Errorf("a member sees %d members (%v), want 2", n, err)
		}
	}
	if n, err := probe.Members(ctx, "http://"+intruder.Admin); err != nil || n != 1 {
		t.Errorf("the intruder sees %d members (%v), want 1", n, err)
	}
}

// A full disk is a clear local error: a blob larger than the free space of
// the data directory (a small tmpfs) gets 507 saying the node's disk is
// full, with nothing from the upstream, and the store keeps working for a
// blob that fits.
func TestDiskFull(t *testing.T) {
	need(t, os.Geteuid() == 0, "root, to mount a tmpfs")
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", dir).CombinedOutput(); err != nil {
		t.Fatalf("mount tmpfs: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", dir).Run() })
	reg := startRegistry(t)
	big, err := reg.PushBlob(context.Background(), "disk/full", testregistry.RandomBytes(32<<20, 5))
	if err != nil {
		t.Fatal(err)
	}
	small, err := reg.PushBlob(context.Background(), "disk/full", testregistry.RandomBytes(2<<20, 6))
	if err != nil {
		t.Fatal(err)
	}
	reg.ResetCounters()
	px := startProxy(t, dir, "--upstream", "disk.invalid="+reg.URL)
	url := func(d string) string { return "http://" + px.Addr + "/v2/disk/full/blobs/" + d + "?ns=disk.invalid" }
	resp, err := http.Get(url(big))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusInsufficientStorage || !strings.Contains(string(body), "disk is full") {
		t.Fatalf("blob larger than the disk: %d %s", resp.StatusCode, body)
	}
	if n := reg.BlobBytes(); n != 0 {
		t.Errorf("the upstream sent %d blob bytes for a blob that cannot be stored", n)
	}
	waitOutput(t, px.proc, `"msg":"disk full"`, 10*time.Second)
	if _, err := fetchVerified(url(small), small); err != nil {
		t.Fatalf("a blob that fits, after the full disk: %v", err)
	}
}

// A member that lies (it holds the secret): it reports itself as an idle
// 100 Gbit/s host, so every child prefers it, announces blobs as complete,
// and sends corrupt or trickling pieces. A child pulling through an honest
// node gets the right bytes or a cut-off response, never wrong bytes that
// end cleanly, and the blob it stores is the right one.
func TestEvilMember(t *testing.T) {
	for _, tc := range []struct {
		name, faults string
		evidence     []string // one of these in the child's log
	}{
		// Caught piece by piece by the owner's checksums, or at the end by
		// the digest.
		{"corrupt and complete", "inflate,complete,corrupt", []string{"piece checksum mismatch", "failed its digest"}},
		// Moved to a faster parent after a second, or, with none, taken
		// away below pieces.min_rate.
		{"trickling", "inflate,trickle=20000", []string{"below the minimum rate", "moving a slow piece"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reg := startRegistry(t)
			const size = 32 << 20
			d := pushBlob(t, reg, size, 51)
			ids := []string{"node-a", "node-b", "node-c"}
			rank := owner.Rank(d, ids)
			evil, child := rank[1], rank[2] // the owner is honest
			c := newCluster(t, reg, ids)
			idx := map[string]int{}
			for i, id := range ids {
				idx[id] = i
				if id == evil {
					t.Setenv("REGISTRY_PROXY_FAULTS", tc.faults)
					c.nodes = append(c.nodes, c.startNodeBin(t, i, *faultyBin, "--config", writeTOML(t, "[upload.syncer]\ninterval = \"300ms\"\n")))
				} else {
					t.Setenv("REGISTRY_PROXY_FAULTS", "")
					c.nodes = append(c.nodes, c.startNode(t, i, "--config", writeTOML(t, "[upload.syncer]\ninterval = \"300ms\"\n")))
				}
			}
			c.waitMembers(t, len(ids))
			// The evil member holds the blob (its own download is honest).
			if _, err := fetchVerified(c.url(idx[evil], "cluster/blob", d), d); err != nil {
				t.Fatal(err)
			}
			// The child's first pull: the right bytes, or cut off.
			n, got, err := getBlob(context.Background(), c.url(idx[child], "cluster/blob", d))
			switch {
			case err == nil && got == digest.Digest(d):
				t.Logf("first pull through %s: right bytes", child)
			case err != nil:
				t.Logf("first pull through %s: cut off after %d bytes (%v)", child, n, err)
			default:
				t.Fatalf("first pull through %s ended cleanly with wrong bytes (%s)", child, got)
			}
			// Every later pull: the right bytes.
			if _, err := fetchVerified(c.url(idx[child], "cluster/blob", d), d); err != nil {
				t.Fatalf("second pull through %s: %v", child, err)
			}
			out := c.nodes[idx[child]].output()
			found := false
			for _, e := range tc.evidence {
				found = found || strings.Contains(out, e)
			}
			if !found {
				t.Errorf("%s's log shows none of %q", child, tc.evidence)
			}
			st := stats(t, c.nodes[idx[child]], d)
			t.Logf("%s's sources: %v", child, st.Sources)
			if st.Sources[evil] != 0 {
				t.Errorf("the stored blob counts %d bytes from the lying member", st.Sources[evil])
			}
		})
	}
}

// The mirror is not an open relay, with the binary: a registry neither
// configured nor allowed gets 404 NAME_UNKNOWN without a connection, even a
// listening one on loopback; a configured upstream's redirect to another
// loopback port is not followed; an upstream's absurd size claim is refused
// before anything is allocated.
func TestNotAnOpenRelay(t *testing.T) {
	var hits atomic.Int64
	bystander := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		w.Header().Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
		io.WriteString(w, "{}")
	}))
	defer bystander.Close()
	d := "sha256:" + strings.Repeat("ab", 32)
	liar := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case strings.Contains(r.URL.Path, "/redirect/"):
			http.Redirect(w, r, bystander.URL+r.URL.Path, http.StatusTemporaryRedirect)
		case r.Method == http.MethodHead && strings.Contains(r.URL.Path, "/blobs/"):
			w.Header().Set("Content-Length", "1152921504606846976") // 1 EiB
			w.Header().Set("Docker-Content-Digest", d)
		default:
			http.NotFound(w, r)
		}
	}))
	defer liar.Close()
	px := startProxy(t, "", "--upstream", "liar.invalid="+liar.URL)
	get := func(path string) (int, string) {
		resp, err := http.Get("http://" + px.Addr + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	bhost := strings.TrimPrefix(bystander.URL, "http://")
	for _, ns := range []string{bhost, "127.0.0.1:22", "169.254.169.254", "localhost", "metadata.google.internal"} {
		for _, p := range []string{"/v2/a/b/manifests/latest", "/v2/a/b/blobs/" + d, "/v2/"} {
			code, body := get(p + "?ns=" + ns)
			if p == "/v2/" {
				continue // the base answers 200 whatever ns says; it dials nothing unknown either
			}
			if code != http.StatusNotFound || !strings.Contains(body, "NAME_UNKNOWN") {
				t.Errorf("%s?ns=%s: %d %s; want 404 NAME_UNKNOWN", p, ns, code, body)
			}
		}
	}
	if code, body := get("/v2/redirect/x/manifests/latest?ns=liar.invalid"); code != http.StatusBadGateway {
		t.Errorf("redirect to another loopback port: %d %s; want 502", code, body)
	}
	if n := hits.Load(); n != 0 {
		t.Errorf("the bystander on loopback was reached %d times", n)
	}
	code, body := get("/v2/a/b/blobs/" + d + "?ns=liar.invalid")
	if code != http.StatusForbidden || !strings.Contains(body, "too large") {
		t.Errorf("a 1 EiB blob: %d %s; want 403 DENIED", code, body)
	}
	// Still serving.
	if code, _ := get("/healthz"); code != 200 {
		t.Fatalf("after the relay attempts: healthz %d", code)
	}
	// Operators' endpoints answer on the admin listener only.
	if code, _ := get("/debug/members"); code != http.StatusNotFound {
		t.Errorf("/debug/members on the mirror port: %d", code)
	}
	resp, err := http.Get("http://" + px.Admin + "/debug/members")
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("/debug/members on the admin listener: %v %v", resp, err)
	}
	resp.Body.Close()
}

// operatorCerts makes, with openssl as an operator would, a CA and a
// certificate for each node id, and returns the directory holding
// ca.crt, <id>.crt and <id>.key.
func operatorCerts(t *testing.T, ids ...string) string {
	t.Helper()
	dir := t.TempDir()
	ossl := func(args ...string) {
		t.Helper()
		cmd := exec.Command("openssl", args...)
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("openssl %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	ossl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
		"-days", "1", "-subj", "/CN=operator CA")
	for _, id := range ids {
		ossl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", id+".key", "-out", id+".csr", "-subj", "/CN="+id)
		ossl("x509", "-req", "-in", id+".csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out", id+".crt", "-days", "1")
	}
	return dir
}

// Peers with certificates from the operator's CA (p2p.tls) form a cluster
// and share a blob; a node whose certificate comes from another CA gets
// nothing from their peer ports, and a certificate naming another node is
// refused at start-up.
func TestOperatorCertificates(t *testing.T) {
	need(t, func() bool { _, err := exec.LookPath("openssl"); return err == nil }(), "openssl")
	ids := []string{"node-a", "node-b"}
	certs := operatorCerts(t, ids...)
	reg := startRegistry(t)
	d := pushBlob(t, reg, 16<<20, 71)
	c := newCluster(t, reg, ids)
	c.secret = "" // certificates only
	tlsConf := func(id string) string {
		return writeTOML(t, fmt.Sprintf("[p2p.tls]\nca = %q\ncert = %q\nkey = %q\n", filepath.Join(certs, "ca.crt"),
			filepath.Join(certs, id+".crt"), filepath.Join(certs, id+".key")))
	}
	for i, id := range ids {
		c.nodes = append(c.nodes, c.startNode(t, i, "--config", tlsConf(id)))
	}
	c.waitMembers(t, 2)
	for i := range ids {
		if _, err := fetchVerified(c.url(i, "cluster/blob", d), d); err != nil {
			t.Fatalf("pull through %s: %v", ids[i], err)
		}
	}
	if got := reg.BlobBytes(); got != 16<<20 {
		t.Errorf("upstream sent %d bytes for two pulls of a 16 MiB blob, want one copy", got)
	}
	// Another CA's certificate: refused by the peer port.
	other := operatorCerts(t, "node-x")
	id, err := trust.FromFiles(filepath.Join(other, "ca.crt"), filepath.Join(other, "node-x.crt"), filepath.Join(other, "node-x.key"), "node-x")
	if err != nil {
		t.Fatal(err)
	}
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: id.ClientConfig()}}
	if resp, err := client.Get("https://" + c.peers[0] + "/pieces/" + d + "/0"); err == nil {
		resp.Body.Close()
		t.Errorf("a certificate of another CA got status %d", resp.StatusCode)
	}
	// A certificate that names another node: exit 2 at start.
	out, err := exec.Command(*proxyBin, "serve", "--listen", "127.0.0.1:0", "--data-dir", t.TempDir(), "--node-id", "node-b",
		"--peer-listen", "127.0.0.1:1", "--config", tlsConf("node-a")).CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() == 0 || !strings.Contains(string(out), "not this node") {
		t.Errorf("a certificate for node-a on node-b: %v, %s", err, out)
	}
}
