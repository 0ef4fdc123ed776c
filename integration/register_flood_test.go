package integration

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/registry-proxy/registry-proxy/metrics"
	"github.com/registry-proxy/registry-proxy/p2p/pb"
)

// vmRSS is a process's resident memory in KiB, from /proc.
func vmRSS(t testing.TB, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			n, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatal("no VmRSS")
	return 0
}

// A member floods one node with Register calls for random digests (issue
// 34: 60,000 were all accepted, each a HEAD upstream with the node's
// credentials). Now most are refused, the registry sees a handful of
// HEADs, the node's memory stays put, and pulls still work.
func TestRegisterFlood(t *testing.T) {
	c := startCluster(t, 3, "--config", writeTOML(t, "[admin]\npprof = true\n"))
	d := pushBlob(t, c.reg, 4<<20, 61)
	cc := c.memberConn(t, c.secret, c.ids[1]) // node-b, to node-a
	client := pb.NewTrackerClient(cc)
	pid := c.nodes[0].cmd.Process.Pid
	// heap is node-a's live heap after a garbage collection, in bytes.
	heap := func() float64 {
		resp, err := http.Get("http://" + c.nodes[0].Admin + "/debug/pprof/heap?gc=1&debug=1")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "# HeapAlloc = "); ok {
				n, err := strconv.ParseFloat(v, 64)
				if err != nil {
					t.Fatal(err)
				}
				return n
			}
		}
		t.Fatalf("no HeapAlloc in the heap profile: %.200s", b)
		return 0
	}
	rssBefore, heapBefore := vmRSS(t, pid), heap()
	c.reg.ResetCounters()

	const calls, workers = 20000, 8
	deadline := time.Now().Add(90 * time.Second)
	var mu sync.Mutex
	codesSeen := map[codes.Code]int{}
	var wg sync.WaitGroup
	began := time.Now()
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < calls && time.Now().Before(deadline); i += workers {
				var b [32]byte
				rand.Read(b[:])
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				_, err := client.Register(ctx, &pb.RegisterRequest{Digest: digest.NewDigestFromBytes(digest.SHA256, b[:]).String(),
					HostId: c.ids[1], Registry: clusterRegistry, Repository: "cluster/blob"})
				cancel()
				mu.Lock()
				codesSeen[status.Code(err)]++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	took := time.Since(began)
	total, accepted := 0, codesSeen[codes.OK]
	for _, n := range codesSeen {
		total += n
	}
	refused := codesSeen[codes.ResourceExhausted] + codesSeen[codes.FailedPrecondition]
	heads := c.reg.BlobHeads()
	rssAfter, heapAfter := vmRSS(t, pid), heap()
	t.Logf("%d Register calls in %v: %d accepted, %d refused (codes %v); registry: %d blob HEADs, %d blob GETs; node-a RSS %d → %d KiB, live heap %.1f → %.1f MiB",
		total, took.Round(time.Millisecond), accepted, refused, codesSeen, heads, c.reg.BlobGets(), rssBefore, rssAfter, heapBefore/(1<<20), heapAfter/(1<<20))
	time.Sleep(5 * time.Second)
	// The RSS holds the garbage of 20,000 TLS gRPC calls until the
	// runtime returns it; what the node keeps is the live heap.
	if grew := heapAfter - heapBefore; grew > 8<<20 {
		t.Errorf("node-a's live heap grew %.1f MiB", grew/(1<<20))
	}
	if total < calls/2 {
		t.Errorf("only %d calls made in the time allowed", total)
	}
	if refused < total*9/10 {
		t.Errorf("%d of %d refused, want most", refused, total)
	}
	// FailBurst (8) upstream requests for the member, then one each 10 s.
	if limit := int64(8 + took/(10*time.Second) + 2); heads > limit {
		t.Errorf("the registry saw %d blob HEADs, want at most %d", heads, limit)
	}
	v, err := metrics.Scrape(context.Background(), "http://"+c.nodes[0].Admin+"/metrics")
	if err != nil {
		t.Fatal(err)
	}
	if n := v.Sum("registry_proxy_peer_calls_refused_total", `call="register"`); int(n) != refused {
		t.Errorf("peer_calls_refused_total{call=register} = %v, want %d", n, refused)
	}
	// The cluster still pulls, through every node (node-b's own budget at
	// node-a is spent: it fetches from the next in rank or itself).
	for i := range c.nodes {
		if _, err := fetchVerified(c.url(i, "cluster/blob", d), d); err != nil {
			t.Fatalf("pull through %s after the flood: %v", c.ids[i], err)
		}
	}
	t.Logf("after pulls: registry %d blob GETs, %d blob HEADs", c.reg.BlobGets(), c.reg.BlobHeads())
}
