package integration

import (
	"context"
	"flag"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/docker/go-units"

	"github.com/registry-proxy/registry-proxy/internal/netlab"
	"github.com/registry-proxy/registry-proxy/internal/probe"
	"github.com/registry-proxy/registry-proxy/internal/report"
)

var (
	csNodes = flag.Int("cold-nodes", 8, "BenchmarkColdStart: nodes started at the same instant")
	csSize  = flag.String("cold-size", "128MiB", "BenchmarkColdStart: the blob every node pulls once all are ready")
	csBw    = flag.String("cold-bw", "25MB", "BenchmarkColdStart: each node's and the upstream's bytes/s")
	csRuns  = flag.Int("cold-runs", 3, "BenchmarkColdStart: repetitions")
)

// coldResult is one cold start: when every node saw every other and was
// ready, and what the first pull cost the upstream.
type coldResult struct {
	Joined, Ready, Pull float64 // seconds from the start of every process; the pull's from its own start
	Copies              float64 // upstream blob bytes / blob size
	Bound               float64 // the pull's lower bound (Kumar–Ross), seconds
}

// runColdStart starts n registry-proxies in network namespaces at the same
// instant, each joined to the first as a DaemonSet's are to its seed, and
// pulls one blob on every node the moment all are ready.
func runColdStart(tb testing.TB, n int, size, bps int64) coldResult {
	needRoot(tb)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	u := &undoer{}
	unregister := onInterrupt(u.run)
	defer func() { unregister(); u.run() }()
	lab := newLabCluster(tb, ctx, u, "rp-cold-", n, bps, "--blob", fmt.Sprint(size))
	info, regURL, admins := lab.info, lab.regURL, lab.admins
	start := time.Now()
	lab.start(tb, ctx, u)
	var wg sync.WaitGroup
	var res coldResult
	joined := make([]bool, n)
	ready := make([]bool, n)
	for !allTrue(ready) || !allTrue(joined) {
		if ctx.Err() != nil || time.Since(start) > 2*time.Minute {
			tb.Fatalf("after %v: joined %v, ready %v", time.Since(start), joined, ready)
		}
		for i, a := range admins {
			if !joined[i] {
				if m, err := probe.Members(ctx, a); err == nil && m == n {
					joined[i] = true
				}
			}
			if !ready[i] {
				if resp, err := http.Get(a + "/readyz"); err == nil {
					ready[i] = resp.StatusCode == http.StatusOK
					resp.Body.Close()
				}
			}
		}
		if allTrue(joined) && res.Joined == 0 {
			res.Joined = time.Since(start).Seconds()
		}
		time.Sleep(20 * time.Millisecond)
	}
	res.Ready = time.Since(start).Seconds()
	if res.Joined == 0 {
		res.Joined = res.Ready
	}
	pullStart := time.Now()
	errs := make([]error, n)
	for i, h := range lab.hosts {
		wg.Go(func() {
			errs[i] = pullBlobs(ctx, h, "state", regURL, "http://"+h.IP+":5000", []benchBlob{{info.Digest, size}})
		})
	}
	wg.Wait()
	res.Pull = time.Since(pullStart).Seconds()
	for i, err := range errs {
		if err != nil {
			tb.Fatalf("node-%02d: %v", i+1, err)
		}
	}
	res.Copies = float64(statsOf(tb, info).Bytes) / float64(size)
	rates := make([]float64, n)
	for i := range rates {
		rates[i] = float64(bps)
	}
	res.Bound = report.KumarRoss(float64(size), float64(bps), rates, rates)
	return res
}

func allTrue(b []bool) bool { return !slices.Contains(b, false) }

// labCluster is n registry-proxies' hosts in network namespaces with
// bps up and down, and an upstream registry in its own host sending bps.
type labCluster struct {
	hosts               []*netlab.Host
	admins              []string
	info                registryInfo
	regURL              string
	runDir, cfg, secret string
}

// newLabCluster makes the hosts and starts the registry (cmd/testregistry
// with regArgs); u undoes it all.
func newLabCluster(tb testing.TB, ctx context.Context, u *undoer, prefix string, n int, bps int64, regArgs ...string) *labCluster {
	tb.Helper()
	l := &labCluster{}
	var err error
	if l.runDir, err = os.MkdirTemp("", prefix); err != nil {
		tb.Fatal(err)
	}
	u.add(func() { os.RemoveAll(l.runDir) })
	lab, err := netlab.New(ctx)
	if err != nil {
		tb.Fatal(err)
	}
	u.add(func() { lab.Close() })
	regHost, err := lab.AddHost(ctx, 1, netlab.Limits{Up: bps})
	if err != nil {
		tb.Fatal(err)
	}
	l.info = startRegistryIn(tb, ctx, u, regHost, 5000, regArgs...)
	l.regURL = "http://" + regHost.IP + ":5000"
	for i := range n {
		h, err := lab.AddHost(ctx, i+2, netlab.Limits{Up: bps, Down: bps})
		if err != nil {
			tb.Fatal(err)
		}
		l.hosts = append(l.hosts, h)
		l.admins = append(l.admins, "http://"+h.IP+":5001")
	}
	l.secret = writeSecret(tb)
	l.cfg = filepath.Join(l.runDir, "config.toml")
	if err := os.WriteFile(l.cfg, []byte(fmt.Sprintf("[upload]\ninterface = \"eth0\"\nmax_tx = \"%d\"\nmax_rx = \"%d\"\n", bps, bps)), 0o644); err != nil {
		tb.Fatal(err)
	}
	return l
}

// start starts every node at the same instant, each joined to the first as
// a DaemonSet's are to its seed (the first to the second).
func (l *labCluster) start(tb testing.TB, ctx context.Context, u *undoer) {
	tb.Helper()
	var wg sync.WaitGroup
	for i, h := range l.hosts {
		seed := l.hosts[0].IP + ":7000"
		if i == 0 {
			seed = l.hosts[1%len(l.hosts)].IP + ":7000"
		}
		wg.Go(func() {
			startIn(tb, ctx, u, h, nil, *proxyBin, "serve", "--config", l.cfg, "--listen", h.IP+":5000", "--peer-listen", h.IP+":7000", "--join", seed,
				"--admin-listen", h.IP+":5001", "--cluster-secret", l.secret, "--node-id", fmt.Sprintf("node-%02d", i+1),
				"--upstream", "bench.invalid="+l.regURL, "--data-dir", filepath.Join(l.runDir, fmt.Sprint(i)), "--log-level", "warn", "--containerd-address", "none")
		})
	}
	wg.Wait()
}

// BenchmarkColdStart: `make bench-coldstart`. Nodes started at the same
// instant: seconds until every node sees every other, until every /readyz
// answers 200, the all-at-once pull after that, and the upstream copies it took.
func BenchmarkColdStart(b *testing.B) {
	size, err := units.RAMInBytes(*csSize)
	if err != nil {
		b.Fatal(err)
	}
	bw, err := units.FromHumanSize(*csBw)
	if err != nil {
		b.Fatal(err)
	}
	var joined, ready, pull, copies []float64
	for range b.N {
		for run := range *csRuns {
			r := runColdStart(b, *csNodes, size, bw)
			b.Logf("run %d: %d nodes: all joined %.2fs, all ready %.2fs after start; pull %.2fs (%.2f x the bound %.2fs); upstream copies %.3f",
				run+1, *csNodes, r.Joined, r.Ready, r.Pull, r.Pull/r.Bound, r.Bound, r.Copies)
			joined, ready, pull, copies = append(joined, r.Joined), append(ready, r.Ready), append(pull, r.Pull/r.Bound), append(copies, r.Copies)
		}
	}
	b.ReportMetric(report.MedianOf(joined), "joined-s")
	b.ReportMetric(report.MedianOf(ready), "ready-s")
	b.ReportMetric(report.MedianOf(pull), "pull/bound")
	b.ReportMetric(report.MedianOf(copies), "copies")
	b.ReportMetric(0, "ns/op")
}

// The cold start CI runs: 4 nodes at once join each other, become ready,
// and their first pull takes one copy from the upstream.
func TestColdStartNamespaces(t *testing.T) {
	r := runColdStart(t, 4, 16<<20, 25e6)
	t.Logf("4 nodes: all joined %.2fs, ready %.2fs; pull %.2fs, %.3f upstream copies", r.Joined, r.Ready, r.Pull, r.Copies)
	if r.Copies > 1.05 {
		t.Errorf("the first pull after a cold start took %.3f copies from the upstream, want 1", r.Copies)
	}
}
