package integration

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net/http"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/docker/go-units"

	"github.com/registry-proxy/registry-proxy/internal/probe"
	"github.com/registry-proxy/registry-proxy/internal/report"
)

var (
	phNodes  = flag.Int("preheat-nodes", 8, "BenchmarkPreheat: nodes")
	phLayers = flag.String("preheat-layers", "96MiB,64MiB,32MiB", "BenchmarkPreheat: the image's layers")
	phBw     = flag.String("preheat-bw", "25MB", "BenchmarkPreheat: each node's and the upstream's bytes/s")
	phRuns   = flag.Int("preheat-runs", 3, "BenchmarkPreheat: repetitions")
)

// preheatResult is one preheat and the pulls after it.
type preheatResult struct {
	Took, Bound  float64 // seconds: the preheat, and its Kumar–Ross bound
	Copies       float64 // upstream blob bytes during the preheat / the image's blob bytes
	PullUpstream int64   // upstream blob bytes while every node pulled every blob after
	Output       string
}

// upstreamStats is what the test registry has sent since its counters were
// reset: blob bytes, and when it last wrote any.
type upstreamStats struct {
	Bytes     int64
	LastWrite time.Time
}

// statsOf reads a test registry's counters.
func statsOf(tb testing.TB, info registryInfo) upstreamStats {
	tb.Helper()
	resp, err := http.Get(info.Stats + "/_stats")
	if err != nil {
		tb.Fatal(err)
	}
	defer resp.Body.Close()
	var st struct {
		BlobBytes int64 `json:"blob_bytes"`
		LastWrite int64 `json:"last_blob_write_unix_ns"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		tb.Fatal(err)
	}
	out := upstreamStats{Bytes: st.BlobBytes}
	if st.LastWrite != 0 {
		out.LastWrite = time.Unix(0, st.LastWrite)
	}
	return out
}

// runPreheat starts n nodes in network namespaces, preheats an image of
// the given layers with `registry-proxy preheat` on the first node, then
// pulls every blob through every node.
func runPreheat(tb testing.TB, n int, layers string, bps int64) preheatResult {
	needRoot(tb)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	u := &undoer{}
	unregister := onInterrupt(u.run)
	defer func() { unregister(); u.run() }()
	lab := newLabCluster(tb, ctx, u, "rp-preheat-", n, bps, "--blob", "1KiB", "--image", layers)
	info, hosts, admins := lab.info, lab.hosts, lab.admins
	lab.start(tb, ctx, u)
	deadline := time.Now().Add(2 * time.Minute)
	for i, a := range admins {
		for {
			if m, err := probe.Members(ctx, a); err == nil && m == n {
				break
			}
			if time.Now().After(deadline) {
				tb.Fatalf("node-%02d did not see all %d members", i+1, n)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}

	var res preheatResult
	var size int64
	var blobs []string
	if info.Image == nil {
		tb.Fatal("the registry pushed no image")
	}
	for _, l := range info.Image.Layers {
		size += l.Size
		blobs = append(blobs, l.Digest)
	}
	blobs = append(blobs, info.Image.Config)
	before := statsOf(tb, info).Bytes
	start := time.Now()
	out, err := exec.CommandContext(ctx, *proxyBin, "preheat", "--admin", admins[0], "bench.invalid/bench/image:latest").CombinedOutput()
	res.Took = time.Since(start).Seconds()
	res.Output = string(out)
	if err != nil {
		tb.Fatalf("registry-proxy preheat: %v\n%s", err, out)
	}
	res.Copies = float64(statsOf(tb, info).Bytes-before) / float64(size)
	rates := make([]float64, n)
	for i := range rates {
		rates[i] = float64(bps)
	}
	res.Bound = report.KumarRoss(float64(size), float64(bps), rates, rates)

	before = statsOf(tb, info).Bytes
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i, h := range hosts {
		wg.Go(func() {
			for _, d := range blobs {
				url := "http://" + h.IP + ":5000/v2/bench/image/blobs/" + d + "?ns=bench.invalid"
				out, err := h.Command(ctx, "sh", "-c", "curl -sS --fail "+url+" | "+hashCmd).CombinedOutput()
				if err == nil && !strings.HasPrefix(string(out), strings.TrimPrefix(d, "sha256:")) {
					err = fmt.Errorf("digest mismatch")
				}
				if err != nil {
					errs[i] = fmt.Errorf("node-%02d: %s: %w: %s", i+1, d, err, out)
					return
				}
			}
		})
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			tb.Fatal(err)
		}
	}
	res.PullUpstream = statsOf(tb, info).Bytes - before
	return res
}

// Preheat on 4 nodes in network namespaces: every node gets every blob of
// the image, the upstream sends about one copy, and pulls on all nodes
// after it take nothing from the upstream.
func TestPreheatNamespaces(t *testing.T) {
	r := runPreheat(t, 4, "16MiB,8MiB,4MiB", 25e6)
	t.Logf("preheat of 4 nodes: %.2fs (%.2f × the bound %.2fs), %.3f upstream copies\n%s", r.Took, r.Took/r.Bound, r.Bound, r.Copies, r.Output)
	if r.PullUpstream != 0 {
		t.Errorf("pulls after the preheat took %d blob bytes from the upstream, want 0", r.PullUpstream)
	}
	if r.Copies > 1.05 {
		t.Errorf("the preheat took %.3f copies from the upstream, want about 1", r.Copies)
	}
	for _, want := range []string{"node-01", "node-04", "on 4 nodes", "; 0 failed"} {
		if !strings.Contains(r.Output, want) {
			t.Errorf("preheat's output lacks %q", want)
		}
	}
}

// BenchmarkPreheat: `make bench-preheat`. A preheat of an image on N nodes
// at once, against the Kumar–Ross bound for its bytes, and the upstream
// copies it took.
func BenchmarkPreheat(b *testing.B) {
	bw, err := units.FromHumanSize(*phBw)
	if err != nil {
		b.Fatal(err)
	}
	var ratio, copies []float64
	for range b.N {
		for run := range *phRuns {
			r := runPreheat(b, *phNodes, *phLayers, bw)
			b.Logf("run %d: %d nodes, layers %s: preheat %.2fs (%.2f × the bound %.2fs), upstream copies %.3f, pull after: %d upstream bytes",
				run+1, *phNodes, *phLayers, r.Took, r.Took/r.Bound, r.Bound, r.Copies, r.PullUpstream)
			ratio, copies = append(ratio, r.Took/r.Bound), append(copies, r.Copies)
		}
	}
	b.ReportMetric(report.MedianOf(ratio), "preheat/bound")
	b.ReportMetric(report.MedianOf(copies), "copies")
	b.ReportMetric(0, "ns/op")
}
