package integration

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/docker/go-units"

	"github.com/registry-proxy/registry-proxy/internal/netlab"
	"github.com/registry-proxy/registry-proxy/internal/probe"
)

var (
	cbNodes        = flag.Int("cluster-nodes", 8, "BenchmarkCluster: proxies, one per network namespace")
	cbSize         = flag.String("cluster-size", "128MiB", "BenchmarkCluster: blob size")
	cbUp           = flag.String("cluster-up", "50MB", "BenchmarkCluster: each node's upload and download, bytes/s")
	cbOrigin       = flag.String("cluster-origin", "50MB", "BenchmarkCluster: the upstream registry's upload, bytes/s")
	cbModes        = flag.String("cluster-modes", "state,fcfs,direct", "BenchmarkCluster: modes to run")
	cbSyncInterval = flag.String("cluster-sync-interval", "3s", "BenchmarkCluster: upload.syncer.interval of the proxies")
	cbResults      = flag.String("cluster-results", "", "BenchmarkCluster: directory for JSON and Markdown results (default results/cluster-<time>)")
	cbLogLevel     = flag.String("cluster-log-level", "warn", "BenchmarkCluster: the proxies' log level")
)

// clusterRun is one scenario run in one mode.
type clusterRun struct {
	Scenario    string             `json:"scenario"`
	Mode        string             `json:"mode"` // state, fcfs, direct
	Nodes       int                `json:"nodes"`
	Size        int64              `json:"size"`
	NodeBps     int64              `json:"node_bps"`
	OriginBps   int64              `json:"origin_bps"`
	Seconds     map[string]float64 `json:"seconds"` // per node
	P50         float64            `json:"p50"`
	P95         float64            `json:"p95"`
	Max         float64            `json:"max"`
	Bound       float64            `json:"bound"`
	MaxOverBnd  float64            `json:"max_over_bound"`
	Egress      int64              `json:"upstream_egress"`
	EgressRatio float64            `json:"egress_over_size"`
	BySource    map[string]int64   `json:"bytes_by_source"` // summed over nodes: upstream, peer
	ByParent    map[string]int64   `json:"bytes_by_parent"` // summed over nodes
}

// kumarRoss is the lower bound on the time for N nodes to get one file of F
// bytes from an origin with upload uo, nodes with uploads u and downloads d.
func kumarRoss(n int, f, uo, u, d float64) float64 {
	return max(f/uo, f/d, float64(n)*f/(uo+float64(n)*u))
}

func percentile(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(p*float64(len(sorted)) + 0.5)
	return sorted[min(max(i-1, 0), len(sorted)-1)]
}

// runClusterA runs scenario (a): every node pulls one blob at once over equal
// links, through registry-proxy (state or fcfs) or straight from the upstream.
func runClusterA(tb testing.TB, mode string, nodes int, size, nodeBps, originBps int64) clusterRun {
	needRoot(tb)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	lab, err := netlab.New(ctx)
	if err != nil {
		tb.Fatal(err)
	}
	defer lab.Close()
	regHost, err := lab.AddHost(ctx, 1, netlab.Limits{Up: originBps})
	if err != nil {
		tb.Fatal(err)
	}
	reg := regHost.Command(ctx, *regBin, "--listen", regHost.IP+":5000", "--blob", fmt.Sprint(size))
	regOut, _ := reg.StdoutPipe()
	if err := reg.Start(); err != nil {
		tb.Fatal(err)
	}
	defer func() { reg.Process.Kill(); reg.Wait() }()
	var info struct{ Digest, Stats string }
	if err := json.NewDecoder(bufio.NewReader(regOut)).Decode(&info); err != nil {
		tb.Fatalf("testregistry: %v", err)
	}

	var hosts []*netlab.Host
	for i := 0; i < nodes; i++ {
		h, err := lab.AddHost(ctx, i+2, netlab.Limits{Up: nodeBps, Down: nodeBps})
		if err != nil {
			tb.Fatal(err)
		}
		hosts = append(hosts, h)
	}
	regURL := "http://" + regHost.IP + ":5000"
	// Host state from the namespace's own interface, maxima as tc shapes it.
	cfg := writeTOML(tb, fmt.Sprintf("[upload]\ninterface = \"eth0\"\nmax_tx = \"%d\"\nmax_rx = \"%d\"\n[upload.syncer]\ninterval = \"%s\"\n", nodeBps, nodeBps, *cbSyncInterval))
	if mode != "direct" {
		for i, h := range hosts {
			join := hosts[(i+1)%len(hosts)].IP + ":7000"
			if i > 0 {
				join = hosts[0].IP + ":7000"
			}
			p := h.Command(ctx, *proxyBin, "serve", "--config", cfg, "--listen", h.IP+":5000", "--peer-listen", h.IP+":7000", "--join", join,
				"--node-id", fmt.Sprintf("node-%02d", i+1), "--selector", mode, "--upstream", "bench.invalid="+regURL,
				"--data-dir", tb.TempDir(), "--log-level", *cbLogLevel)
			p.Stderr = os.Stderr
			if err := p.Start(); err != nil {
				tb.Fatal(err)
			}
			defer func() { p.Process.Kill(); p.Wait() }()
		}
		var mirrors []string
		for _, h := range hosts {
			mirrors = append(mirrors, "http://"+h.IP+":5000")
		}
		if err := probe.WaitMembers(ctx, mirrors, nodes, 60*time.Second); err != nil {
			tb.Fatal(err)
		}
		time.Sleep(2 * time.Second) // host state reaches every follower
	}

	res := clusterRun{Scenario: "a", Mode: mode, Nodes: nodes, Size: size, NodeBps: nodeBps, OriginBps: originBps,
		Seconds: map[string]float64{}, BySource: map[string]int64{}, ByParent: map[string]int64{}}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for i, h := range hosts {
		url := regURL + "/v2/bench/blob/blobs/" + info.Digest
		if mode != "direct" {
			url = "http://" + h.IP + ":5000/v2/bench/blob/blobs/" + info.Digest + "?ns=bench.invalid"
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			start := time.Now()
			out, err := h.Command(ctx, "sh", "-c", "curl -sS --fail "+url+" | sha256sum").CombinedOutput()
			secs := time.Since(start).Seconds()
			if err != nil || !strings.HasPrefix(string(out), strings.TrimPrefix(info.Digest, "sha256:")) {
				tb.Errorf("node %d: %v %s", i+1, err, out)
			}
			mu.Lock()
			res.Seconds[fmt.Sprintf("node-%02d", i+1)] = secs
			mu.Unlock()
		}()
	}
	wg.Wait()
	if resp, err := http.Get(info.Stats + "/_stats"); err == nil {
		var st struct {
			BlobBytes int64 `json:"blob_bytes"`
		}
		json.NewDecoder(resp.Body).Decode(&st)
		resp.Body.Close()
		res.Egress = st.BlobBytes
	}
	if mode != "direct" {
		for _, h := range hosts {
			st, err := probe.Blob(ctx, "http://"+h.IP+":5000", info.Digest)
			if err != nil {
				continue
			}
			for src, n := range st.Sources {
				res.ByParent[src] += n
				if src == "upstream" {
					res.BySource["upstream"] += n
				} else {
					res.BySource["peer"] += n
				}
			}
		}
	} else {
		res.BySource["upstream"] = res.Egress
	}
	var secs []float64
	for _, s := range res.Seconds {
		secs = append(secs, s)
	}
	sort.Float64s(secs)
	res.P50, res.P95, res.Max = percentile(secs, 0.5), percentile(secs, 0.95), secs[len(secs)-1]
	res.Bound = kumarRoss(nodes, float64(size), float64(originBps), float64(nodeBps), float64(nodeBps))
	res.MaxOverBnd = res.Max / res.Bound
	res.EgressRatio = float64(res.Egress) / float64(size)
	return res
}

// BenchmarkCluster runs the cluster scenarios on real processes in network
// namespaces with tc limits: `make bench-cluster`.
func BenchmarkCluster(b *testing.B) {
	size, err := units.RAMInBytes(*cbSize)
	if err != nil {
		b.Fatal(err)
	}
	up, err := units.FromHumanSize(*cbUp)
	if err != nil {
		b.Fatal(err)
	}
	origin, err := units.FromHumanSize(*cbOrigin)
	if err != nil {
		b.Fatal(err)
	}
	dir := *cbResults
	if dir == "" {
		dir = filepath.Join("..", "results", "cluster-"+time.Now().UTC().Format("20060102-150405"))
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		b.Fatal(err)
	}
	var all []clusterRun
	for i := 0; i < b.N; i++ {
		for _, mode := range strings.Split(*cbModes, ",") {
			r := runClusterA(b, mode, *cbNodes, size, up, origin)
			all = append(all, r)
			js, _ := json.MarshalIndent(r, "", "  ")
			os.WriteFile(filepath.Join(dir, fmt.Sprintf("a-%s-%d.json", mode, len(all))), js, 0o644)
			b.Logf("scenario a, %-6s: nodes %d, blob %s, links %s/s, origin %s/s | p50 %.2fs p95 %.2fs max %.2fs | bound %.2fs, max/bound %.2f | upstream egress %.3f x blob | bytes %v",
				mode, *cbNodes, units.BytesSize(float64(size)), units.HumanSize(float64(up)), units.HumanSize(float64(origin)),
				r.P50, r.P95, r.Max, r.Bound, r.MaxOverBnd, r.EgressRatio, r.BySource)
		}
	}
	md := summary(all)
	os.WriteFile(filepath.Join(dir, "summary.md"), []byte(md), 0o644)
	b.Logf("results in %s\n%s", dir, md)
	for _, mode := range strings.Split(*cbModes, ",") {
		var mx []float64
		for _, r := range all {
			if r.Mode == mode {
				mx = append(mx, r.MaxOverBnd)
			}
		}
		sort.Float64s(mx)
		b.ReportMetric(percentile(mx, 0.5), mode+"-max/bound")
	}
	b.ReportMetric(0, "ns/op")
}

// summary is a Markdown table of medians per mode.
func summary(runs []clusterRun) string {
	byMode := map[string][]clusterRun{}
	var modes []string
	for _, r := range runs {
		if _, ok := byMode[r.Mode]; !ok {
			modes = append(modes, r.Mode)
		}
		byMode[r.Mode] = append(byMode[r.Mode], r)
	}
	med := func(rs []clusterRun, f func(clusterRun) float64) float64 {
		var v []float64
		for _, r := range rs {
			v = append(v, f(r))
		}
		sort.Float64s(v)
		return percentile(v, 0.5)
	}
	var sb strings.Builder
	sb.WriteString("| mode | runs | p50 s | p95 s | max s | bound s | max/bound | upstream egress / blob |\n|---|---|---|---|---|---|---|---|\n")
	for _, m := range modes {
		rs := byMode[m]
		fmt.Fprintf(&sb, "| %s | %d | %.2f | %.2f | %.2f | %.2f | %.2f | %.3f |\n", m, len(rs),
			med(rs, func(r clusterRun) float64 { return r.P50 }), med(rs, func(r clusterRun) float64 { return r.P95 }),
			med(rs, func(r clusterRun) float64 { return r.Max }), med(rs, func(r clusterRun) float64 { return r.Bound }),
			med(rs, func(r clusterRun) float64 { return r.MaxOverBnd }), med(rs, func(r clusterRun) float64 { return r.EgressRatio }))
	}
	return sb.String()
}

// The small version of scenario (a) that CI runs: 3 nodes in namespaces, all
// pulling at once through their proxies; one copy leaves the upstream.
func TestClusterNamespacesSmall(t *testing.T) {
	const size = 16 << 20
	r := runClusterA(t, "state", 3, size, 25e6, 25e6)
	t.Logf("3 nodes, 16 MiB, 25 MB/s: p50 %.2fs max %.2fs, bound %.2fs, upstream egress %.3f x, bytes %v", r.P50, r.Max, r.Bound, r.EgressRatio, r.BySource)
	if r.EgressRatio > 1.05 {
		t.Errorf("upstream egress %.3f x the blob, want <= 1.05", r.EgressRatio)
	}
	if len(r.Seconds) != 3 {
		t.Errorf("%d nodes finished, want 3", len(r.Seconds))
	}
}
