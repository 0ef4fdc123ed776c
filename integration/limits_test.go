package integration

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/registry-proxy/registry-proxy/internal/testregistry"
)

// One client cannot take a node down: a client that never reads is cut off
// after limits.write_stall, one address gets at most limits.client_conns
// connections, and downloads beyond limits.tasks get 503 with Retry-After
// while the running one completes.
func TestLimits(t *testing.T) {
	reg := startRegistry(t)
	ctx := context.Background()
	big, err := reg.PushBlob(ctx, "limits/blob", testregistry.RandomBytes(64<<20, 41))
	if err != nil {
		t.Fatal(err)
	}
	other, err := reg.PushBlob(ctx, "limits/blob", testregistry.RandomBytes(1<<20, 42))
	if err != nil {
		t.Fatal(err)
	}
	cfg := writeTOML(t, "[limits]\nwrite_stall = \"1s\"\nclient_conns = 3\ntasks = 1\n")
	px := startProxy(t, "", "--config", cfg, "--upstream", "limits.invalid="+reg.URL)
	url := func(d string) string {
		return "http://" + px.Addr + "/v2/limits/blob/blobs/" + d + "?ns=limits.invalid"
	}

	t.Run("tasks", func(t *testing.T) {
		reg.SetPace(16 << 20) // four seconds for the big blob
		defer reg.SetPace(0)
		first := make(chan error, 1)
		go func() { _, err := fetchVerified(url(big), big); first <- err }()
		waitOutput(t, px.proc, `"msg":"blob download started"`, 10*time.Second)
		resp, err := http.Get(url(other))
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") == "" {
			t.Errorf("a download beyond limits.tasks: %d %q %s", resp.StatusCode, resp.Header.Get("Retry-After"), body)
		}
		if err := <-first; err != nil {
			t.Fatalf("the running download: %v", err)
		}
		// Readers finish once the blob is verified; the task ends with its commit.
		waitOutput(t, px.proc, `"msg":"blob complete"`, 10*time.Second)
		if _, err := fetchVerified(url(other), other); err != nil {
			t.Fatalf("after the first finished: %v", err)
		}
	})

	t.Run("client that never reads", func(t *testing.T) {
		conn, err := net.Dial("tcp", px.Addr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		// A tiny receive buffer, so the kernel takes little of the blob.
		conn.(*net.TCPConn).SetReadBuffer(4096)
		io.WriteString(conn, "GET /v2/limits/blob/blobs/"+big+"?ns=limits.invalid HTTP/1.1\r\nHost: x\r\n\r\n")
		waitOutput(t, px.proc, "i/o timeout", 30*time.Second)
	})

	t.Run("connections per address", func(t *testing.T) {
		var conns []net.Conn
		defer func() {
			for _, c := range conns {
				c.Close()
			}
		}()
		// The earlier subtest's connection may still be closing: fill up
		// to the cap and one more, then check the last is closed.
		var last net.Conn
		for range 4 {
			c, err := net.Dial("tcp", px.Addr)
			if err != nil {
				t.Fatal(err)
			}
			conns = append(conns, c)
			last = c
		}
		waitOutput(t, px.proc, "too many from one address", 10*time.Second)
		last.SetReadDeadline(time.Now().Add(10 * time.Second))
		n, err := last.Read(make([]byte, 1))
		if n != 0 || (err != io.EOF && !strings.Contains(err.Error(), "reset")) {
			t.Errorf("the connection over the cap: read %d, %v; want it closed", n, err)
		}
	})
}

// An upstream that trickles (and one that ignores Range, the whole-body
// path) cannot keep a download going after every client left: it is
// stopped after limits.idle_download, and its pieces stay.
func TestTricklingUpstreamAbandoned(t *testing.T) {
	for _, ignoreRange := range []bool{false, true} {
		t.Run(fmt.Sprintf("ignore range %v", ignoreRange), func(t *testing.T) {
			reg := startRegistry(t)
			d, err := reg.PushBlob(context.Background(), "limits/blob", testregistry.RandomBytes(32<<20, 43))
			if err != nil {
				t.Fatal(err)
			}
			reg.SetPace(64 << 10) // 64 KiB/s a connection: minutes for the blob
			reg.SetIgnoreRange(ignoreRange)
			cfg := writeTOML(t, "[limits]\nidle_download = \"2s\"\n")
			px := startProxy(t, "", "--config", cfg, "--upstream", "limits.invalid="+reg.URL)
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan struct{})
			go func() {
				defer close(done)
				getBlob(ctx, "http://"+px.Addr+"/v2/limits/blob/blobs/"+d+"?ns=limits.invalid")
			}()
			waitOutput(t, px.proc, `"msg":"blob download started"`, 10*time.Second)
			cancel() // the client leaves
			<-done
			waitOutput(t, px.proc, "stopping a download nobody wants", 30*time.Second)
			waitOutput(t, px.proc, `"msg":"blob download stopped"`, 30*time.Second)
		})
	}
}

// Every local process is 127.0.0.1: one holding limits.client_conns idle
// keep-alive connections must not lock the node's containerd out. At the
// cap the longest idle connection is closed for the new one; a pull goes
// through while they are held.
func TestIdleConnectionsDoNotLockOutContainerd(t *testing.T) {
	reg, _ := sharedImage(t)
	px := startProxy(t, "", "--upstream", mirroredRegistry+"="+reg.URL)
	const held = 256 // limits.client_conns, the default
	// Each its own connection: a request answered, then kept open, idle.
	for i := range held {
		conn, err := net.Dial("tcp", px.Addr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		io.WriteString(conn, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
		conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			t.Fatalf("idle connection %d: %v", i, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	c := startContainerd(t, containerds[len(containerds)-1], px.Addr)
	ref := mirroredRegistry + "/" + imageRepo + ":" + imageTag
	c.ctrCmd(t, "images", "pull", "--hosts-dir", c.hosts, "--snapshotter", "native", ref)
	if strings.Contains(px.proc.output(), "too many from one address") {
		t.Errorf("a connection was refused while idle ones were held:\n%s", tail(px.proc.output(), 20))
	}
}

// Metric labels come from bounded sets: 30,000 requests with methods of
// their own make one series, "other", not 30,000.
func TestMetricLabelsBounded(t *testing.T) {
	px := startProxy(t, "")
	admin := px.Admin
	series := func() int {
		resp, err := http.Get("http://" + admin + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return strings.Count(string(b), "\nregistry_proxy_http_requests_total{")
	}
	before := series()
	tr := &http.Transport{MaxIdleConnsPerHost: 8}
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr}
	deadline := time.Now().Add(2 * time.Minute)
	for i := range 30000 {
		req, _ := http.NewRequest(fmt.Sprintf("M%d", i), "http://"+px.Addr+"/v2/", nil)
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if time.Now().After(deadline) {
			t.Fatalf("only %d requests in 2 minutes", i)
		}
	}
	after := series()
	t.Logf("http_requests_total series: %d before, %d after 30,000 requests with distinct methods", before, after)
	if after-before > 1 {
		t.Fatalf("%d new series from client methods; want at most one (other)", after-before)
	}
}
