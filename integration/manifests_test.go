package integration

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/registry-proxy/registry-proxy/internal/netlab"
	"github.com/registry-proxy/registry-proxy/internal/probe"
	"github.com/registry-proxy/registry-proxy/internal/testregistry"
)

// The manifest tests: one pull per image for the whole cluster, and pulls
// by tag that keep working while the registry is down or rate-limiting
// (DESIGN.md, "Manifests and tags"; CLIENTS.md, "What registries meter").
// Every node is a network namespace with one registry-proxy and one
// containerd 2.x, pulling with crictl through CRI and no credentials, as
// kubelet does; the registry (cmd/testregistry, driven through its
// --control API) has a namespace of its own.

var (
	mfNodes      = flag.Int("manifests-nodes", 4, "TestManifests: nodes, each a proxy and a containerd 2.x in a network namespace")
	mfBenchNodes = flag.Int("manifests-bench-nodes", 2, "BenchmarkWarmPullByTag: nodes of its cluster (node 1 pulls)")
)

// The layer files of each platform image: small, so the test measures
// manifests and tags rather than bytes.
var mfLayers = []int64{2 << 20, 1 << 20}

const (
	mfUser = "alice"
	mfPass = "wonderland"
	// mfAuthz is mfUser:mfPass as basic auth.
	mfAuthz = "Basic YWxpY2U6d29uZGVybGFuZA=="
	// mfAccept is what containerd sends when it resolves a tag.
	mfAccept = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*"
	// mfStaleHeader marks an answer from what the cluster last resolved.
	mfStaleHeader = "X-Registry-Proxy-Stale"
)

// mfLab is the cluster of the manifest tests.
type mfLab struct {
	tb      testing.TB
	ctx     context.Context
	reg     string // the registry's host:port, as image references name it
	control string // its control API
	crictl  string
	nodes   []*mfNode
}

type mfNode struct {
	id     string
	host   *netlab.Host
	mirror string // http://ip:5000
	admin  string // http://ip:5001
	ep     string // containerd's socket, unix://...
	proxy  *logBuffer
	ctd    *logBuffer
}

// startMfLab builds an n-node cluster; everything goes at cleanup.
func startMfLab(tb testing.TB, n int) *mfLab {
	tb.Helper()
	needRoot(tb)
	crictl := tool(tb, "crictl")
	ctd := containerdFor(tb, "2.x")
	daemon, ctr := ctd.daemon(tb), ctd.ctr(tb)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	u := &undoer{}
	unregister := onInterrupt(u.run)
	l := &mfLab{tb: tb, ctx: ctx, crictl: crictl}
	tb.Cleanup(func() {
		if tb.Failed() {
			for _, nd := range l.nodes {
				tb.Logf("--- %s registry-proxy log:\n%s", nd.id, tail(nd.proxy.String(), 6000))
				if s := nd.ctd.String(); s != "" {
					tb.Logf("--- %s containerd log:\n%s", nd.id, tail(s, 3000))
				}
			}
		}
		unregister()
		u.run()
		cancel()
	})
	// Short: containerd's socket path must fit in 108 bytes.
	runDir, err := os.MkdirTemp("/tmp", "rp-mf-")
	if err != nil {
		tb.Fatal(err)
	}
	u.add(func() {
		exec.Command("chmod", "-R", "u+w", runDir).Run() // snapshots may hold read-only dirs
		os.RemoveAll(runDir)
	})
	lab, regHost := newClusterLab(tb, ctx, u, 0)
	startRegistryIn(tb, ctx, u, regHost, 5000, "--blob", "1KiB", "--control", regHost.IP+":5003")
	l.reg = regHost.IP + ":5000"
	l.control = "http://" + regHost.IP + ":5003"

	secret := writeSecret(tb)
	var admins []string
	for i := range n {
		h, err := lab.AddHost(ctx, i+2, netlab.Limits{})
		if err != nil {
			tb.Fatal(err)
		}
		nd := &mfNode{id: fmt.Sprintf("node-%02d", i+1), host: h, mirror: "http://" + h.IP + ":5000", admin: "http://" + h.IP + ":5001",
			proxy: &logBuffer{}, ctd: &logBuffer{}}
		l.nodes = append(l.nodes, nd)
		admins = append(admins, nd.admin)
	}
	for i, nd := range l.nodes {
		join := l.nodes[(i+1)%n].host.IP + ":7000"
		if i > 0 {
			join = l.nodes[0].host.IP + ":7000"
		}
		ip := nd.host.IP
		mfStart(tb, ctx, u, nd.host, nd.proxy, nil, *proxyBin, "serve", "--listen", ip+":5000", "--peer-listen", ip+":7000", "--join", join,
			"--admin-listen", ip+":5001", "--cluster-secret", secret, "--node-id", nd.id,
			"--upstream", l.reg+"=http://"+l.reg, "--containerd-address", "none",
			"--data-dir", filepath.Join(runDir, nd.id), "--log-level", "info")
	}
	// containerd 2.x per node: the registry is the server, the node's
	// mirror its one host, as an operator writes hosts.toml.
	for i, nd := range l.nodes {
		dir := filepath.Join(runDir, fmt.Sprintf("c%d", i))
		d := filepath.Join(dir, "certs.d", l.reg)
		if err := os.MkdirAll(d, 0o755); err != nil {
			tb.Fatal(err)
		}
		hosts := fmt.Sprintf("server = \"http://%s\"\n\n[host.\"%s\"]\n  capabilities = [\"pull\", \"resolve\"]\n", l.reg, nd.mirror)
		if err := os.WriteFile(filepath.Join(d, "hosts.toml"), []byte(hosts), 0o644); err != nil {
			tb.Fatal(err)
		}
		cfg := filepath.Join(dir, "config.toml")
		// Each its own NRI socket: by default every containerd of the
		// machine binds /var/run/nri/nri.sock, and all but one fail.
		conf := ctd.config(dir, "overlayfs") + fmt.Sprintf("[plugins.\"io.containerd.nri.v1.nri\"]\n  socket_path = \"%s/nri.sock\"\n", dir)
		if err := os.WriteFile(cfg, []byte(conf), 0o644); err != nil {
			tb.Fatal(err)
		}
		mfStart(tb, ctx, u, nd.host, nd.ctd, nil, daemon, "--config", cfg, "--log-level", "warn")
		nd.ep = "unix://" + dir + "/c.sock"
	}
	if err := probe.WaitMembers(ctx, admins, n, 90*time.Second); err != nil {
		tb.Fatal(err)
	}
	for i, nd := range l.nodes {
		sock := strings.TrimPrefix(nd.ep, "unix://")
		deadline := time.Now().Add(60 * time.Second)
		for exec.Command(ctr, "--address", sock, "version").Run() != nil {
			if time.Now().After(deadline) {
				tb.Fatalf("containerd of node %d did not come up: %s", i, nd.ctd.String())
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	return l
}

// mfStart runs a daemon in host h, its output in out, in its own process
// group, killed by u.
func mfStart(tb testing.TB, ctx context.Context, u *undoer, h *netlab.Host, out io.Writer, env []string, name string, args ...string) {
	tb.Helper()
	cmd := h.Command(ctx, name, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.Env = append(os.Environ(), env...)
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	u.add(func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-done
		}
	})
}

// ctl POSTs to the registry's control API and decodes its answer into out.
func (l *mfLab) ctl(path string, q url.Values, out any) {
	l.tb.Helper()
	resp, err := http.Post(l.control+path+"?"+q.Encode(), "", nil)
	if err != nil {
		l.tb.Fatalf("registry control %s: %v", path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		l.tb.Fatalf("registry control %s %v: %d %s", path, q, resp.StatusCode, b)
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			l.tb.Fatalf("registry control %s: %v: %s", path, err, b)
		}
	}
}

func (l *mfLab) stats() testregistry.Stats {
	l.tb.Helper()
	resp, err := http.Get(l.control + "/stats")
	if err != nil {
		l.tb.Fatalf("registry stats: %v", err)
	}
	defer resp.Body.Close()
	var st testregistry.Stats
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		l.tb.Fatal(err)
	}
	return st
}

// push pushes an OCI index (this machine's platform and one other, each
// with mfLayers of its own) as repo:tag.
func (l *mfLab) push(repo, tag string, seed uint64) *testregistry.Index {
	l.tb.Helper()
	var sizes []string
	for _, n := range mfLayers {
		sizes = append(sizes, fmt.Sprint(n))
	}
	var ix testregistry.Index
	l.ctl("/push", url.Values{"repo": {repo}, "tag": {tag}, "seed": {fmt.Sprint(seed)}, "layers": {strings.Join(sizes, ",")}}, &ix)
	if ix.Native() == nil {
		l.tb.Fatalf("pushed index %s has no image for this machine", ix.Digest)
	}
	return &ix
}

func (l *mfLab) outage(mode string) {
	l.tb.Helper()
	l.ctl("/outage", url.Values{"mode": {mode}}, nil)
}

func (l *mfLab) ref(repo, tag string) string { return l.reg + "/" + repo + ":" + tag }

// crictlOn runs crictl against node i's containerd, bounded by timeout;
// it returns crictl's stdout, and its stderr in the error.
func (l *mfLab) crictlOn(i int, timeout time.Duration, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(l.ctx, timeout)
	defer cancel()
	ep := l.nodes[i].ep
	all := append([]string{"--runtime-endpoint", ep, "--image-endpoint", ep, "--timeout", timeout.String()}, args...)
	cmd := exec.CommandContext(ctx, l.crictl, all...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		// Without the lines about the config files crictl looks for.
		var msg []string
		for _, line := range strings.Split(stderr.String(), "\n") {
			if line != "" && !strings.Contains(line, "crictl.yaml") {
				msg = append(msg, line)
			}
		}
		return string(out) + stderr.String(), fmt.Errorf("crictl %s: %w: %s", strings.Join(args, " "), err, tail(strings.Join(msg, "; "), 800))
	}
	return string(out), nil
}

// pull is kubelet's pull on node i: by tag, through CRI, no credentials.
func (l *mfLab) pull(i int, ref string, timeout time.Duration) (time.Duration, error) {
	t0 := time.Now()
	_, err := l.crictlOn(i, timeout, "pull", ref)
	return time.Since(t0), err
}

// digests are the manifest digests node i's containerd has for ref.
func (l *mfLab) digests(i int, ref string) []string {
	l.tb.Helper()
	out, err := l.crictlOn(i, time.Minute, "inspecti", "-o", "json", ref)
	if err != nil {
		l.tb.Errorf("node %d: %v", i, err)
		return nil
	}
	var st struct {
		Status struct{ RepoDigests []string }
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		l.tb.Errorf("node %d: crictl inspecti: %v: %s", i, err, tail(out, 500))
	}
	var ds []string
	for _, rd := range st.Status.RepoDigests {
		if _, d, ok := strings.Cut(rd, "@"); ok {
			ds = append(ds, d)
		}
	}
	return ds
}

// checkDigest says whether node i has ref at digest want.
func (l *mfLab) checkDigest(t *testing.T, i int, ref, want string) {
	t.Helper()
	if got := l.digests(i, ref); !slices.Contains(got, want) {
		t.Errorf("node %d has %s at %v, want %s", i, ref, got, want)
	}
}

func (l *mfLab) rmi(i int, ref string) {
	l.tb.Helper()
	if out, err := l.crictlOn(i, time.Minute, "rmi", ref); err != nil && !strings.Contains(out, "not found") {
		l.tb.Fatalf("node %d: %v", i, err)
	}
}

// pullAll pulls ref on the nodes given, all at once; durations by node.
func (l *mfLab) pullAll(t *testing.T, nodes []int, ref string) (map[int]time.Duration, map[int]error) {
	var mu sync.Mutex
	took, errs := map[int]time.Duration{}, map[int]error{}
	var wg sync.WaitGroup
	for _, i := range nodes {
		wg.Go(func() {
			d, err := l.pull(i, ref, 3*time.Minute)
			mu.Lock()
			defer mu.Unlock()
			took[i] = d
			if err != nil {
				errs[i] = err
			}
		})
	}
	wg.Wait()
	return took, errs
}

// metrics sums the series of the named metrics over every node's admin
// /metrics, by series ("name{labels}").
func (l *mfLab) metrics(names ...string) map[string]float64 {
	out := map[string]float64{}
	for _, nd := range l.nodes {
		resp, err := http.Get(nd.admin + "/metrics")
		if err != nil {
			l.tb.Logf("%s /metrics: %v", nd.id, err)
			continue
		}
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			line := sc.Text()
			if strings.HasPrefix(line, "#") {
				continue
			}
			for _, n := range names {
				if strings.HasPrefix(line, n+"{") || strings.HasPrefix(line, n+" ") {
					i := strings.LastIndexByte(line, ' ')
					if v, err := strconv.ParseFloat(line[i+1:], 64); err == nil {
						out[line[:i]] += v
					}
				}
			}
		}
		resp.Body.Close()
	}
	return out
}

func metricTotal(m map[string]float64, name string) float64 {
	var s float64
	for k, v := range m {
		if k == name || strings.HasPrefix(k, name+"{") {
			s += v
		}
	}
	return s
}

func metricDelta(before, after map[string]float64) map[string]float64 {
	d := map[string]float64{}
	for k, v := range after {
		if v-before[k] != 0 {
			d[k] = v - before[k]
		}
	}
	return d
}

// mfCounts is what the registry saw between two stats.
type mfCounts struct {
	gets, heads, tooMany, blobBytes int64
	byRef                           map[string]int64
}

func mfDelta(before, after testregistry.Stats) mfCounts {
	c := mfCounts{gets: after.ManifestGets - before.ManifestGets, heads: after.ManifestHeads - before.ManifestHeads,
		tooMany: after.TooManyRequests - before.TooManyRequests, blobBytes: after.BlobBytes - before.BlobBytes, byRef: map[string]int64{}}
	for k, v := range after.ManifestsByRef {
		if v-before.ManifestsByRef[k] != 0 {
			c.byRef[k] = v - before.ManifestsByRef[k]
		}
	}
	return c
}

// copies is how many times the registry sent the bytes containerd needs
// of ix: the native image's layers and config.
func (c mfCounts) copies(ix *testregistry.Index) float64 {
	n := ix.Native()
	return float64(c.blobBytes) / float64(n.LayerBytes()+n.ConfigSize)
}

func fmtTimes(took map[int]time.Duration) string {
	var ks []int
	for k := range took {
		ks = append(ks, k)
	}
	sort.Ints(ks)
	var s []string
	for _, k := range ks {
		s = append(s, fmt.Sprintf("node %d %.2fs", k, took[k].Seconds()))
	}
	return strings.Join(s, ", ")
}

// mirrorRequest sends method on node i's mirror for repo/manifests/ref
// (or blobs/<digest> when blob is set), as containerd would; authz
// empty: anonymous.
func (l *mfLab) mirrorRequest(t *testing.T, i int, method, repo, kind, ref, authz string) (*http.Response, []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(l.ctx, 45*time.Second)
	defer cancel()
	u := fmt.Sprintf("%s/v2/%s/%s/%s?ns=%s", l.nodes[i].mirror, repo, kind, ref, url.QueryEscape(l.reg))
	req, _ := http.NewRequestWithContext(ctx, method, u, nil)
	req.Header.Set("Accept", mfAccept)
	if authz != "" {
		req.Header.Set("Authorization", authz)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, u, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, b
}

// mirrorTry is mirrorRequest bounded by timeout, returning a transport
// error (a timeout included) instead of failing the test.
func (l *mfLab) mirrorTry(i int, method, repo, kind, ref string, timeout time.Duration) (int, error) {
	ctx, cancel := context.WithTimeout(l.ctx, timeout)
	defer cancel()
	u := fmt.Sprintf("%s/v2/%s/%s/%s?ns=%s", l.nodes[i].mirror, repo, kind, ref, url.QueryEscape(l.reg))
	req, _ := http.NewRequestWithContext(ctx, method, u, nil)
	req.Header.Set("Accept", mfAccept)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, resp.Body)
	return resp.StatusCode, nil
}

// nodeOf names the node at a client address the registry saw.
func (l *mfLab) nodeOf(ip string) string {
	for _, nd := range l.nodes {
		if nd.host.IP == ip {
			return nd.id
		}
	}
	return ip
}

func seq(n int) []int {
	s := make([]int, n)
	for i := range s {
		s[i] = i
	}
	return s
}

// TestManifests: the registry sees one GET per manifest digest for the
// whole cluster, pulls by tag keep working through an outage and a pull
// limit, a moved tag is never stale while the registry answers, and private
// content stays private when the registry cannot be asked.
func TestManifests(t *testing.T) {
	n := *mfNodes
	if n < 4 {
		t.Fatalf("-manifests-nodes %d: the outage cases need at least 4", n)
	}
	l := startMfLab(t, n)
	const stale = "registry_proxy_stale_answers_total"
	const manifests = "registry_proxy_manifests_total"

	// a. Nodes pull one after the other: the first pull's manifests come
	// from the registry, every later one's from the cluster.
	t.Run("in-turn", func(t *testing.T) {
		ix := l.push("mf/inturn", "v1", 101)
		ref := l.ref("mf/inturn", "v1")
		m0, st0 := l.metrics(manifests), l.stats()
		took := map[int]time.Duration{}
		for i := range n {
			d, err := l.pull(i, ref, 3*time.Minute)
			if err != nil {
				t.Errorf("node %d: %v", i, err)
				continue
			}
			took[i] = d
			l.checkDigest(t, i, ref, ix.Digest)
		}
		c := mfDelta(st0, l.stats())
		t.Logf("%d nodes in turn: registry manifest GETs %d (by ref %v), HEADs %d, blob copies %.3f; %s; mirrors' manifests %v",
			n, c.gets, c.byRef, c.heads, c.copies(ix), fmtTimes(took), metricDelta(m0, l.metrics(manifests)))
		if c.gets != 2 {
			t.Errorf("the registry answered %d manifest GETs for %d pulls in turn; want 2 (the index and the platform manifest, once for the cluster)", c.gets, n)
		}
		if x := c.copies(ix); x > 1.1 {
			t.Errorf("the registry sent the image's blobs %.2f times, want about once", x)
		}
	})

	// b. All nodes pull a fresh image at once.
	t.Run("at-once", func(t *testing.T) {
		ix := l.push("mf/atonce", "v1", 201)
		ref := l.ref("mf/atonce", "v1")
		m0, st0 := l.metrics(manifests), l.stats()
		took, errs := l.pullAll(t, seq(n), ref)
		for i, err := range errs {
			t.Errorf("node %d: %v", i, err)
		}
		for i := range n {
			if errs[i] == nil {
				l.checkDigest(t, i, ref, ix.Digest)
			}
		}
		c := mfDelta(st0, l.stats())
		t.Logf("%d nodes at once: registry manifest GETs %d (by ref %v), HEADs %d, blob copies %.3f; %s; mirrors' manifests %v",
			n, c.gets, c.byRef, c.heads, c.copies(ix), fmtTimes(took), metricDelta(m0, l.metrics(manifests)))
		if c.gets != 2 {
			t.Errorf("the registry answered %d manifest GETs for %d pulls at once; want 2", c.gets, n)
		}
		if x := c.copies(ix); x > 1.1 {
			t.Errorf("the registry sent the image's blobs %.2f times, want about once", x)
		}
	})

	// e. A tag moved upstream while the registry answers is never stale:
	// the node that pulled the old image and a node that never pulled both
	// get the new one.
	t.Run("tag-moved", func(t *testing.T) {
		ref := l.ref("mf/moved", "v1")
		old := l.push("mf/moved", "v1", 301)
		if _, err := l.pull(0, ref, 3*time.Minute); err != nil {
			t.Fatalf("node 0, before the move: %v", err)
		}
		l.checkDigest(t, 0, ref, old.Digest)
		moved := l.push("mf/moved", "v1", 302)
		st0 := l.stats()
		for _, i := range []int{0, 1} {
			if _, err := l.pull(i, ref, 3*time.Minute); err != nil {
				t.Errorf("node %d, after the move: %v", i, err)
				continue
			}
			if got := l.digests(i, ref); !slices.Contains(got, moved.Digest) || slices.Contains(got, old.Digest) {
				t.Errorf("node %d has %s at %v after the tag moved from %s to %s", i, ref, got, old.Digest, moved.Digest)
			}
		}
		c := mfDelta(st0, l.stats())
		t.Logf("after the move: registry manifest GETs %d (by ref %v), HEADs %d for two pulls", c.gets, c.byRef, c.heads)
		if c.gets != 2 {
			t.Errorf("the registry answered %d manifest GETs for the moved tag's new image on two nodes; want 2", c.gets)
		}
		if c.heads == 0 {
			t.Error("nobody asked the registry about the tag (no HEAD): the tag was resolved from memory while the registry answered")
		}
	})

	// f. A private repository: a client allowed before the outage is served
	// during it; an anonymous one never.
	t.Run("private", func(t *testing.T) {
		repo := "mf/private"
		l.ctl("/private", url.Values{"repo": {repo}, "user": {mfUser}, "pass": {mfPass}}, nil)
		ix := l.push(repo, "v1", 401)
		layer := ix.Native().Layers[0]
		check := func(when string, i int) {
			resp, _ := l.mirrorRequest(t, i, "GET", repo, "manifests", "v1", mfAuthz)
			if resp.StatusCode != 200 || resp.Header.Get("Docker-Content-Digest") != ix.Digest {
				t.Errorf("%s: node %d: allowed client's GET by tag: %d, digest %q; want 200, %s", when, i, resp.StatusCode, resp.Header.Get("Docker-Content-Digest"), ix.Digest)
			}
			if when == "outage" {
				t.Logf("outage: allowed client's GET by tag on node %d: %s: %q", i, mfStaleHeader, resp.Header.Get(mfStaleHeader))
			}
			resp, _ = l.mirrorRequest(t, i, "GET", repo, "manifests", ix.Native().Digest, mfAuthz)
			if resp.StatusCode != 200 {
				t.Errorf("%s: node %d: allowed client's GET of the platform manifest: %d", when, i, resp.StatusCode)
			}
			resp, body := l.mirrorRequest(t, i, "GET", repo, "blobs", layer.Digest, mfAuthz)
			if resp.StatusCode != 200 || int64(len(body)) != layer.Size {
				t.Errorf("%s: node %d: allowed client's GET of a layer: %d, %d bytes", when, i, resp.StatusCode, len(body))
			}
		}
		refused := func(when string, i int) {
			for _, rq := range [][2]string{{"manifests", "v1"}, {"manifests", ix.Digest}, {"manifests", ix.Native().Digest}, {"blobs", layer.Digest}} {
				for _, method := range []string{"GET", "HEAD"} {
					resp, _ := l.mirrorRequest(t, i, method, repo, rq[0], rq[1], "")
					if c := resp.StatusCode; c != 401 && c != 403 && c != 404 {
						t.Errorf("%s: node %d: anonymous %s %s/%s: %d; want 401, 403 or 404", when, i, method, rq[0], rq[1], c)
					}
				}
			}
		}
		check("up", 0)
		refused("up", 0)
		refused("up", 1)

		l.outage(testregistry.OutageRefuse)
		defer l.outage(testregistry.OutageNone)
		check("outage", 0)
		refused("outage", 0)
		refused("outage", 1)
	})

	// d. The registry is down: pulls by tag work on a node that pulled the
	// image before (removed from its containerd first) and on one that never
	// did; an image nobody holds fails at once.
	for _, mode := range []string{testregistry.OutageRefuse, testregistry.OutageClose} {
		t.Run("outage-"+mode, func(t *testing.T) {
			repo := "mf/outage-" + mode
			ix := l.push(repo, "v1", map[string]uint64{"refuse": 501, "close": 502}[mode])
			ref := l.ref(repo, "v1")
			l.push(repo+"-never", "v1", map[string]uint64{"refuse": 511, "close": 512}[mode])
			never := l.ref(repo+"-never", "v1")
			// Up: every node but the last pulls.
			up := seq(n - 1)
			if _, errs := l.pullAll(t, up, ref); len(errs) > 0 {
				t.Fatalf("pulls while the registry is up failed: %v", errs)
			}
			l.rmi(0, ref)
			m0, st0 := l.metrics(stale, manifests), l.stats()

			l.outage(mode)
			defer l.outage(testregistry.OutageNone)
			for _, i := range []int{0, n - 1} {
				what := map[int]string{0: "pulled it before", n - 1: "never pulled it"}[i]
				d, err := l.pull(i, ref, 2*time.Minute)
				if err != nil {
					t.Errorf("outage %s: node %d, which %s: %v", mode, i, what, err)
					continue
				}
				t.Logf("outage %s: node %d, which %s, pulled in %.2fs", mode, i, what, d.Seconds())
				l.checkDigest(t, i, ref, ix.Digest)
			}
			d, err := l.pull(1, never, time.Minute)
			t.Logf("outage %s: an image no member holds: %.2fs: %v", mode, d.Seconds(), err)
			if err == nil {
				t.Errorf("outage %s: %s, which no member holds, was pulled", mode, never)
			} else if d > 30*time.Second {
				t.Errorf("outage %s: the pull of an image no member holds took %.1fs to fail, want within 30s", mode, d.Seconds())
			}
			t1 := time.Now()
			resp, _ := l.mirrorRequest(t, 2, "HEAD", repo, "manifests", "v1", "")
			t.Logf("outage %s: HEAD of the tag on node 2's mirror: %d in %.2fs, digest %q, %s %q", mode, resp.StatusCode, time.Since(t1).Seconds(), resp.Header.Get("Docker-Content-Digest"), mfStaleHeader, resp.Header.Get(mfStaleHeader))
			if resp.StatusCode != 200 || resp.Header.Get("Docker-Content-Digest") != ix.Digest {
				t.Errorf("outage %s: HEAD of the tag on a mirror: %d, digest %q; want 200, %s", mode, resp.StatusCode, resp.Header.Get("Docker-Content-Digest"), ix.Digest)
			}
			if resp.Header.Get(mfStaleHeader) == "" {
				t.Errorf("outage %s: the mirror's answer from what the cluster last resolved carries no %s", mode, mfStaleHeader)
			}
			st1 := l.stats()
			md := metricDelta(m0, l.metrics(stale, manifests))
			t.Logf("outage %s: mirrors' metrics %v; registry connections cut %d", mode, md, st1.OutageCuts-st0.OutageCuts)
			if metricTotal(md, stale) <= 0 {
				t.Errorf("outage %s: %s did not grow", mode, stale)
			}
		})
	}

	// c. Docker Hub's limit: two manifest GETs (one multi-arch pull) for
	// the whole cluster, every node pulling at once; then with the
	// allowance spent; then whether a node that got a 429 keeps away from
	// the registry until its Retry-After. Last, as a node that got a 429
	// stays away from the registry for 30 s. The image of the spent case
	// is in the cluster before any limit is set: node 0 pulls it (and
	// removes it from its containerd).
	spent := l.push("mf/limit-spent", "v1", 602)
	spentRef := l.ref("mf/limit-spent", "v1")
	if _, err := l.pull(0, spentRef, 3*time.Minute); err != nil {
		t.Fatalf("node 0, before any limit: %v", err)
	}
	l.rmi(0, spentRef)
	defer l.ctl("/limit", url.Values{"n": {"0"}}, nil)
	// spend sets a limit of one GET and spends it from the test's own
	// address: every manifest GET gets 429 from then on.
	spend := func(t *testing.T) {
		l.ctl("/limit", url.Values{"n": {"1"}, "retry_after": {"30"}}, nil)
		resp, err := http.Get("http://" + l.reg + "/v2/mf/limit-spent/manifests/v1")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("spending the allowance: %d", resp.StatusCode)
		}
	}

	t.Run("pull-limit", func(t *testing.T) {
		ix := l.push("mf/limit", "v1", 601)
		ref := l.ref("mf/limit", "v1")
		st0 := l.stats()
		l.ctl("/limit", url.Values{"n": {"2"}, "retry_after": {"30"}}, nil)
		took, errs := l.pullAll(t, seq(n), ref)
		c := mfDelta(st0, l.stats())
		t.Logf("limit 2, %d nodes at once: %d pulls failed, registry manifest GETs %d (by ref %v), 429s %d, HEADs %d; %s",
			n, len(errs), c.gets, c.byRef, c.tooMany, c.heads, fmtTimes(took))
		for i, err := range errs {
			t.Errorf("node %d: %v", i, err)
		}
		for i := range n {
			if errs[i] == nil {
				l.checkDigest(t, i, ref, ix.Digest)
			}
		}
		if c.tooMany > 0 {
			t.Logf("the registry answered %d GETs with 429 (every pull succeeded: %v)", c.tooMany, len(errs) == 0)
		}
	})

	// The allowance spent by someone else behind the same address. The
	// cluster holds the image; every node pulls it by tag: HEADs resolve
	// the tag, the manifests come from members.
	t.Run("pull-limit-spent", func(t *testing.T) {
		spend(t)
		st1 := l.stats()
		took, errs := l.pullAll(t, seq(n), spentRef)
		c := mfDelta(st1, l.stats())
		t.Logf("allowance spent, %d nodes at once: %d pulls failed, registry manifest GETs %d, 429s %d (by ref %v), HEADs %d; %s",
			n, len(errs), c.gets, c.tooMany, c.byRef, c.heads, fmtTimes(took))
		for i, err := range errs {
			t.Errorf("allowance spent: node %d: %v", i, err)
		}
		for i := range n {
			if errs[i] == nil {
				l.checkDigest(t, i, spentRef, spent.Digest)
			}
		}
	})

	// Retry-After is honoured: manifests no member holds, asked of every
	// node twice over, while every GET gets 429 with a Retry-After of 30 s.
	// Whichever node sends a GET and gets 429 sends that registry no other
	// manifest GET until then: no address gets more than one 429. The
	// mirror answers at once (an error, for the client to try its next
	// host), without waiting out the 30 s.
	t.Run("retry-after", func(t *testing.T) {
		spend(t)
		ix := l.push("mf/limit-retry", "v1", 603)
		st2 := l.stats()
		t0 := time.Now()
		var slowest time.Duration
		codes := map[int]int{}
		for range 2 {
			for i := range n {
				for _, d := range []string{ix.Digest, ix.Native().Digest} {
					t1 := time.Now()
					code, err := l.mirrorTry(i, "GET", "mf/limit-retry", "manifests", d, 20*time.Second)
					slowest = max(slowest, time.Since(t1))
					if err != nil {
						t.Errorf("node %d, GET %s: %v", i, d, err)
						continue
					}
					codes[code]++
					if code == 200 {
						t.Errorf("node %d served %s, which no member holds, while every GET upstream gets 429", i, d)
					}
				}
			}
		}
		st3 := l.stats()
		by := map[string]int64{}
		for ip, v := range st3.TooManyByClient {
			if d := v - st2.TooManyByClient[ip]; d != 0 {
				by[l.nodeOf(ip)] = d
			}
		}
		t.Logf("%d requests on the mirrors in %.2fs (slowest %.2fs), answers %v; registry 429s by client %v",
			4*n, time.Since(t0).Seconds(), slowest.Seconds(), codes, by)
		for who, k := range by {
			if k > 1 {
				t.Errorf("%s got %d 429s within the Retry-After of 30s; want at most 1", who, k)
			}
		}
		if slowest > 10*time.Second {
			t.Errorf("a mirror took %.1fs to answer; want an error at once, so that the client tries its next host", slowest.Seconds())
		}
	})
}

// BenchmarkWarmPullByTag times a warm pull by tag on one node: the image is
// in the node's mirror (and the cluster's), removed from its containerd
// before each pull. It reports ns/op and the registry's manifest requests
// per pull.
func BenchmarkWarmPullByTag(b *testing.B) {
	l := startMfLab(b, *mfBenchNodes)
	ix := l.push("mf/warm", "v1", 701)
	ref := l.ref("mf/warm", "v1")
	if _, err := l.pull(0, ref, 3*time.Minute); err != nil {
		b.Fatal(err)
	}
	st0 := l.stats()
	b.ResetTimer()
	for range b.N {
		b.StopTimer()
		l.rmi(0, ref)
		b.StartTimer()
		if _, err := l.pull(0, ref, 3*time.Minute); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	c := mfDelta(st0, l.stats())
	b.ReportMetric(float64(c.gets)/float64(b.N), "registry-manifest-gets/op")
	b.ReportMetric(float64(c.heads)/float64(b.N), "registry-manifest-heads/op")
	b.ReportMetric(float64(c.blobBytes)/float64(b.N), "registry-blob-bytes/op")
	if got := l.digests(0, ref); !slices.Contains(got, ix.Digest) {
		b.Errorf("node 0 has %v, want %s", got, ix.Digest)
	}
}
