package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/registry-proxy/registry-proxy/inspect"
	"github.com/registry-proxy/registry-proxy/internal/probe"
	"github.com/registry-proxy/registry-proxy/metrics"
)

func scrape(t testing.TB, p *proxy) metrics.Values {
	t.Helper()
	v, err := metrics.Scrape(context.Background(), "http://"+p.Admin+"/metrics")
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// eventually polls cond every 50 ms until it holds or d passes.
func eventually(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after %v: %s", d, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// The metrics, `peers` and `status` of a two-node cluster tell what happened.
func TestOperatorView(t *testing.T) {
	c := startCluster(t, 2)
	a, b := c.nodes[0], c.nodes[1]
	const size = 32 << 20
	d := pushBlob(t, c.reg, size, 31)
	// Through node-b twice: downloaded the first time, from the cache after
	// (once stored: the response may end before the commit).
	for i := range 2 {
		if _, err := fetchVerified(c.url(1, "cluster/blob", d), d); err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			waitStored(t, b, size)
		}
	}
	mb, ma := scrape(t, b), scrape(t, a)
	peer, up := mb.Sum("registry_proxy_blob_bytes_total", `source="peer"`), mb.Sum("registry_proxy_blob_bytes_total", `source="upstream"`)
	for _, tc := range []struct {
		what      string
		got, want float64
	}{
		{"node-b: bytes downloaded from peers and the upstream", peer + up, size},
		{"node-b: bytes served from its cache", mb.Sum("registry_proxy_blob_bytes_total", `source="cache"`), size},
		{"node-b: blob GETs answered 200", mb.Sum("registry_proxy_http_requests_total", `kind="blob"`, `method="GET"`, `code="200"`), 2},
		{"node-b: downloads complete", mb.Sum("registry_proxy_blob_downloads_total", `result="complete"`), 1},
		{"node-b: downloads timed", mb.Sum("registry_proxy_blob_download_duration_seconds_count"), 1},
		{"node-b: bytes in its store", mb.Sum("registry_proxy_store_bytes"), size},
		{"node-b: downloads in flight", mb.Sum("registry_proxy_tasks_in_flight"), 0},
		{"node-a: bytes uploaded to peers, as node-b counted them", ma.Sum("registry_proxy_peer_upload_bytes_total"), peer},
	} {
		if tc.got != tc.want {
			t.Errorf("%s: %v, want %v", tc.what, tc.got, tc.want)
		}
	}
	if n := mb.Sum("registry_proxy_pieces_total", `result="ok"`); n < 1 {
		t.Errorf("node-b: %v pieces ok", n)
	}
	if n := mb.Sum("registry_proxy_access_checks_total"); n < 1 {
		t.Errorf("node-b served its cache with %v access checks", n)
	}
	if n := mb.Sum("registry_proxy_upstream_requests_total") + ma.Sum("registry_proxy_upstream_requests_total"); n < 1 {
		t.Errorf("%v upstream requests counted in the cluster", n)
	}
	// Host state streams every second: node-b weighs node-a, node-a has a
	// follower.
	eventually(t, 15*time.Second, "node-b gives node-a no weight", func() bool {
		return scrape(t, b).Sum("registry_proxy_parent_weight", `parent="node-a"`) > 0
	})
	if n := scrape(t, a).Sum("registry_proxy_statesync_subscribers"); n < 1 {
		t.Errorf("node-a: %v SyncHost subscribers", n)
	}

	// Every metric a node serves is documented.
	doc, err := os.ReadFile("../docs/metrics.md")
	if err != nil {
		t.Fatal(err)
	}
	for series := range scrape(t, b) {
		name, _, _ := strings.Cut(series, "{")
		if !strings.HasPrefix(name, "registry_proxy_") {
			continue
		}
		name = strings.TrimSuffix(strings.TrimSuffix(name, "_count"), "_sum")
		if !strings.Contains(string(doc), "`"+name+"`") {
			t.Errorf("%s is not in docs/metrics.md", name)
		}
	}

	// registry-proxy peers, as JSON and as the table.
	out := mustRun(t, 30*time.Second, *proxyBin, "peers", "--admin", b.Admin, "--json")
	var ms []inspect.Member
	if err := json.Unmarshal([]byte(out), &ms); err != nil {
		t.Fatalf("peers --json: %v\n%s", err, out)
	}
	if len(ms) != 2 {
		t.Fatalf("peers --json: %d members\n%s", len(ms), out)
	}
	for _, m := range ms {
		if m.ID == "node-a" && (!m.Followed || m.State == nil || m.Weight <= 0) {
			t.Errorf("peers --json: node-a without its state or weight: %+v", m)
		}
	}
	out = mustRun(t, 30*time.Second, *proxyBin, "peers", "--admin", b.Admin)
	t.Logf("registry-proxy peers:\n%s", out)
	if !strings.Contains(out, "node-b (self)") || !strings.Contains(out, "WEIGHT") || !strings.Contains(out, "node-a  ") {
		t.Errorf("peers table:\n%s", out)
	}

	// registry-proxy status: a download in flight, then none.
	out = mustRun(t, 30*time.Second, *proxyBin, "status", "--admin", a.Admin)
	if !strings.Contains(out, "no downloads in flight") {
		t.Errorf("status of an idle node:\n%s", out)
	}
	d2, err := c.reg.PushBlob(context.Background(), "cluster/slow", make([]byte, 8<<20))
	if err != nil {
		t.Fatal(err)
	}
	c.reg.SetPace(512 << 10)
	done := make(chan error, 1)
	go func() {
		_, err := fetchVerified(c.url(0, "cluster/slow", d2), d2)
		done <- err
	}()
	eventually(t, 20*time.Second, "status never showed the download", func() bool {
		out, _ = run(t, 30*time.Second, *proxyBin, "status", "--admin", a.Admin)
		return strings.Contains(out, d2[:19])
	})
	t.Logf("registry-proxy status:\n%s", out)
	if !strings.Contains(out, clusterRegistry+"/cluster/slow") || !strings.Contains(out, "FROM UPSTREAM") {
		t.Errorf("status table:\n%s", out)
	}
	c.reg.SetPace(0)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	// An admin listener that is not there: a clear error, status 1.
	out, err = run(t, 30*time.Second, *proxyBin, "status", "--admin", "127.0.0.1:1")
	if err == nil || !strings.Contains(out, "admin listener") {
		t.Errorf("status against nothing: %v\n%s", err, out)
	}
}

// SIGHUP applies the reloadable keys, names the ones that need a restart,
// and keeps the running configuration when the file is broken.
func TestSighupReload(t *testing.T) {
	reg := startRegistry(t)
	const size = 8 << 20
	ds := []string{pushBlob(t, reg, size, 40), pushBlob(t, reg, size, 41), pushBlob(t, reg, size, 42)}
	cfg := writeTOML(t, "[upstream]\ntimeout = \"1m\"\n")
	px := startProxy(t, "", "--config", cfg, "--upstream", "reload.invalid="+reg.URL)
	for _, d := range ds {
		if _, err := fetchVerified("http://"+px.Addr+"/v2/cluster/blob/blobs/"+d+"?ns=reload.invalid", d); err != nil {
			t.Fatal(err)
		}
	}
	waitStored(t, px, 3*size)
	hup := func(body string) {
		t.Helper()
		if err := os.WriteFile(cfg, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		px.cmd.Process.Signal(syscall.SIGHUP)
	}
	hup("[upstream]\ntimeout = \"2m\"\n[store]\nhigh_water = \"12MiB\"\n")
	eventually(t, 10*time.Second, "no reload logged", func() bool { return strings.Contains(px.output(), "SIGHUP: configuration reloaded") })
	line := logLine(px.output(), "SIGHUP: configuration reloaded")
	if !strings.Contains(line, `"applied":["store.high_water"]`) || !strings.Contains(line, `"need_restart":["upstream.timeout"]`) {
		t.Errorf("reload log line: %s", line)
	}
	// The new high water mark applies at once: GC takes the store below it.
	eventually(t, 10*time.Second, "GC did not apply the reloaded high_water", func() bool {
		return scrape(t, px).Sum("registry_proxy_store_bytes") <= 12<<20
	})
	hup("[store\nhigh_water = ")
	eventually(t, 10*time.Second, "a broken file was not reported", func() bool {
		return strings.Contains(px.output(), "SIGHUP: configuration not reloaded")
	})
	if resp, err := http.Get("http://" + px.Addr + "/v2/"); err != nil || resp.StatusCode != 200 {
		t.Fatalf("after a broken reload: %v %v", resp, err)
	}
}

// waitStored waits until p's store holds n bytes of complete blobs.
func waitStored(t testing.TB, p *proxy, n float64) {
	t.Helper()
	eventually(t, 10*time.Second, fmt.Sprintf("the store never held %v bytes", n), func() bool {
		return scrape(t, p).Sum("registry_proxy_store_bytes") == n
	})
}

// logLine returns the last log line containing s.
func logLine(out, s string) string {
	lines := strings.Split(out, "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if strings.Contains(lines[i], s) {
			return lines[i]
		}
	}
	return ""
}

// SIGTERM drains: the node leaves the cluster and says so on /readyz, the
// client response in flight completes, and the process exits 0.
func TestDrainOnSigterm(t *testing.T) {
	c := startCluster(t, 2)
	a, b := c.nodes[0], c.nodes[1]
	d := pushBlob(t, c.reg, 8<<20, 51)
	c.reg.SetPace(1 << 20) // a few seconds
	type result struct {
		n   int64
		err error
	}
	done := make(chan result, 1)
	go func() {
		n, err := fetchVerified(c.url(1, "cluster/blob", d), d)
		done <- result{n, err}
	}()
	eventually(t, 20*time.Second, "the download never started", func() bool {
		ts, err := inspect.Client{Base: "http://" + b.Admin}.Tasks(context.Background())
		return err == nil && len(ts) == 1
	})
	b.cmd.Process.Signal(syscall.SIGTERM)
	eventually(t, 5*time.Second, "node-b's /readyz did not say it is shutting down", func() bool {
		resp, err := http.Get("http://" + b.Admin + "/readyz")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode == http.StatusServiceUnavailable && strings.Contains(string(body), "shutting down")
	})
	// node-a learns of the leave from node-b itself, not a failure detector.
	eventually(t, 5*time.Second, "node-a still counts node-b", func() bool {
		n, err := probe.Members(context.Background(), "http://"+a.Admin)
		return err == nil && n == 1
	})
	r := <-done
	if r.err != nil {
		t.Fatalf("the response in flight when SIGTERM came: %v after %d bytes", r.err, r.n)
	}
	select {
	case <-b.done:
	case <-time.After(30 * time.Second):
		t.Fatal("node-b did not exit after draining")
	}
	if code := b.cmd.ProcessState.ExitCode(); code != 0 {
		t.Errorf("node-b exited %d", code)
	}
	for _, s := range []string{"draining: left the cluster", `"msg":"drained"`} {
		if !strings.Contains(b.output(), s) {
			t.Errorf("node-b's log has no %q", s)
		}
	}
}

// download.rate paces a node's piece downloads, and SIGHUP changes it.
func TestDownloadRate(t *testing.T) {
	reg := startRegistry(t)
	const size = 12 << 20
	ds := []string{pushBlob(t, reg, size, 60), pushBlob(t, reg, size, 61)}
	cfg := writeTOML(t, "[download]\nrate = \"2MiB\"\n")
	px := startProxy(t, "", "--config", cfg, "--upstream", "rate.invalid="+reg.URL)
	url := func(d string) string { return "http://" + px.Addr + "/v2/cluster/blob/blobs/" + d + "?ns=rate.invalid" }
	start := time.Now()
	if _, err := fetchVerified(url(ds[0]), ds[0]); err != nil {
		t.Fatal(err)
	}
	// The bucket starts with 4 MiB; the rest comes at 2 MiB/s at most.
	if took, least := time.Since(start), 4*time.Second; took < least {
		t.Errorf("12 MiB at download.rate 2MiB took %v, less than %v", took, least)
	}
	if err := os.WriteFile(cfg, []byte("[download]\nrate = \"0\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	px.cmd.Process.Signal(syscall.SIGHUP)
	eventually(t, 10*time.Second, "no reload logged", func() bool { return strings.Contains(px.output(), `"applied":["download.rate"]`) })
	if _, err := fetchVerified(url(ds[1]), ds[1]); err != nil {
		t.Fatal(err)
	}
}
