package integration

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/registry-proxy/registry-proxy/p2p/pb"
	"github.com/registry-proxy/registry-proxy/piece"
)

// certRun runs the binary's cert command and returns its stdout, stderr
// and exit status.
func certRun(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, *proxyBin, append([]string{"cert"}, args...)...)
	var out, errOut strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		code = ee.ExitCode()
	default:
		t.Fatal(err)
	}
	return out.String(), errOut.String(), code
}

// `registry-proxy cert` makes a client certificate from the cluster secret
// that a real node's peer port accepts for reading (SyncHost, piece bytes)
// and refuses for calls that act as a member; a certificate from another
// secret, for a non-member, or used from another address gets nothing.
// grpcurl, when installed, holds the same session.
func TestCertCommand(t *testing.T) {
	t.Run("flags", func(t *testing.T) {
		secret := writeSecret(t)
		for _, tt := range []struct {
			name string
			args []string
			msg  string
		}{
			{"no secret", []string{"--name", "node-a"}, "--secret FILE is required"},
			{"unreadable secret", []string{"--secret", filepath.Join(t.TempDir(), "missing"), "--name", "node-a"}, "no such file"},
			{"empty secret", []string{"--secret", os.DevNull, "--name", "node-a"}, "no secret"},
			{"no name", []string{"--secret", secret}, "--name is required"},
			{"bad name", []string{"--secret", secret, "--name", "node a"}, "--name"},
			{"zero validity", []string{"--secret", secret, "--name", "node-a", "--valid", "0s"}, "--valid 0s"},
			{"negative validity", []string{"--secret", secret, "--name", "node-a", "--valid", "-1h"}, "--valid -1h"},
			{"over 24h", []string{"--secret", secret, "--name", "node-a", "--valid", "25h"}, "at most 24h"},
			{"argument", []string{"--secret", secret, "--name", "node-a", "extra"}, "unexpected argument"},
		} {
			out, errOut, code := certRun(t, tt.args...)
			if code != 2 || !strings.Contains(errOut, tt.msg) || out != "" {
				t.Errorf("%s: exit %d, stderr %q, stdout %d bytes; want exit 2 saying %q", tt.name, code, errOut, len(out), tt.msg)
			}
		}
	})

	c := startCluster(t, 2)
	const size = 4 << 20
	d := pushBlob(t, c.reg, size, 37)
	if _, err := fetchVerified(c.url(0, "cluster/blob", d), d); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	// The certificate as printed (cert and key), the CAs from --out-dir.
	dir := filepath.Join(t.TempDir(), "debug")
	if out, errOut, code := certRun(t, "--secret", c.secret, "--name", c.ids[1], "--out-dir", dir); code != 0 || !strings.Contains(out, "valid until") {
		t.Fatalf("cert --out-dir: exit %d: %s%s", code, out, errOut)
	}
	if fi, err := os.Stat(filepath.Join(dir, "key.pem")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("key.pem: %v, %v", fi, err)
	}
	caPEM, err := os.ReadFile(filepath.Join(dir, "ca.pem"))
	if err != nil {
		t.Fatal(err)
	}
	printed := func(secret, name string) tls.Certificate {
		t.Helper()
		out, errOut, code := certRun(t, "--secret", secret, "--name", name, "--valid", "10m")
		if code != 0 {
			t.Fatalf("cert: exit %d: %s", code, errOut)
		}
		kp, err := tls.X509KeyPair([]byte(out), []byte(out))
		if err != nil {
			t.Fatalf("the printed certificate and key: %v", err)
		}
		return kp
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		t.Fatal("no certificate in ca.pem")
	}
	// A standard TLS client, as grpcurl's: it verifies node 0 by its name.
	tlsFor := func(kp tls.Certificate) *tls.Config {
		return &tls.Config{Certificates: []tls.Certificate{kp}, RootCAs: roots, ServerName: c.ids[0], MinVersion: tls.VersionTLS13}
	}
	conn := func(cfg *tls.Config, opts ...grpc.DialOption) *grpc.ClientConn {
		t.Helper()
		cc, err := grpc.NewClient("passthrough:///"+c.peers[0], append(opts, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))...)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cc.Close() })
		return cc
	}
	syncHost := func(cc *grpc.ClientConn, hostID string) (*pb.Host, error) {
		sctx, scancel := context.WithTimeout(ctx, 10*time.Second)
		defer scancel()
		st, err := pb.NewHostSyncClient(cc).SyncHost(sctx, &pb.SyncHostRequest{HostId: hostID, PeerId: c.ids[0]})
		if err != nil {
			return nil, err
		}
		return st.Recv()
	}
	member := printed(c.secret, c.ids[1])

	// Reads: SyncHost streams node 0's state; a piece comes over HTTP.
	h, err := syncHost(conn(tlsFor(member)), c.ids[1])
	if err != nil || h.GetId() != c.ids[0] || h.GetAddr() != c.peers[0] {
		t.Fatalf("SyncHost with the member's debugging certificate: %v, %v", h, err)
	}
	t.Logf("SyncHost: %v", h)
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+c.peers[0]+"/pieces/"+d+"/0", nil)
	tr := &http.Transport{TLSClientConfig: tlsFor(member)}
	defer tr.CloseIdleConnections()
	if resp, err := (&http.Client{Transport: tr}).Do(req); err != nil {
		t.Fatalf("piece with the debugging certificate: %v", err)
	} else {
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || int64(len(body)) != piece.PlanFor(size).PieceSize {
			t.Fatalf("piece with the debugging certificate: %d, %d bytes", resp.StatusCode, len(body))
		}
	}
	// Acting as the member: refused.
	rctx, rcancel := context.WithTimeout(ctx, 10*time.Second)
	_, err = pb.NewTrackerClient(conn(tlsFor(member))).Register(rctx, &pb.RegisterRequest{Digest: d, HostId: c.ids[1], Registry: clusterRegistry, Repository: "cluster/blob"})
	rcancel()
	if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "read-only") {
		t.Errorf("Register with a debugging certificate: %v, want PermissionDenied (read-only)", err)
	}

	// Refusals.
	if _, err := syncHost(conn(tlsFor(printed(c.secret, "node-outsider"))), "node-outsider"); status.Code(err) != codes.PermissionDenied {
		t.Errorf("a certificate for a non-member: %v, want PermissionDenied", err)
	}
	other := tlsFor(printed(writeSecret(t), c.ids[1]))
	if _, err := syncHost(conn(other), c.ids[1]); err == nil {
		t.Error("a certificate from another secret was accepted")
	} else {
		t.Logf("another secret: %v", err)
	}
	fromOther := grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) { return fromIP("127.0.0.2")(ctx, "tcp", addr) })
	if _, err := syncHost(conn(tlsFor(member), fromOther), c.ids[1]); status.Code(err) != codes.PermissionDenied {
		t.Errorf("the member's certificate from another address: %v, want PermissionDenied", err)
	}

	t.Run("grpcurl", func(t *testing.T) {
		grpcurl := tool(t, "grpcurl")
		base := []string{"-cacert", filepath.Join(dir, "ca.pem"), "-cert", filepath.Join(dir, "cert.pem"), "-key", filepath.Join(dir, "key.pem"), "-authority", c.ids[0]}
		// Server reflection lists the services.
		out := mustRun(t, 30*time.Second, grpcurl, append(base, c.peers[0], "list")...)
		if !strings.Contains(out, "registryproxy.p2p.v1.HostSync") {
			t.Fatalf("grpcurl list: %s", out)
		}
		// SyncHost from the project's .proto, bounded: a stream of states
		// until -max-time (grpcurl then exits with DeadlineExceeded).
		args := append(base, "-import-path", "../p2p/pb", "-proto", "p2p.proto", "-max-time", "4",
			"-d", `{"host_id": "`+c.ids[1]+`", "peer_id": "`+c.ids[0]+`"}`, c.peers[0], "registryproxy.p2p.v1.HostSync/SyncHost")
		out, err := run(t, 30*time.Second, grpcurl, args...)
		if n := strings.Count(out, `"id": "`+c.ids[0]+`"`); n < 1 || !strings.Contains(out, "DeadlineExceeded") {
			t.Fatalf("grpcurl SyncHost (%v): %d states: %s", err, n, out)
		}
		t.Logf("grpcurl SyncHost: %d states in 4 s", strings.Count(out, `"id": "`+c.ids[0]+`"`))
	})
}
