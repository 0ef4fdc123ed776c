package integration

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/docker/go-units"
	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/internal/testregistry"
)

var benchSize = flag.String("bench-size", "1GiB", "blob size for BenchmarkMirror")

// pull is one timed blob download, verified against its digest as a client
// such as containerd does.
type pull struct {
	total, ttfb time.Duration
	bytes       int64
}

func timedPull(tb testing.TB, url string, d digest.Digest) pull {
	tb.Helper()
	start := time.Now()
	resp, err := http.Get(url)
	if err != nil {
		tb.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		tb.Fatalf("GET %s: %s", url, resp.Status)
	}
	v := d.Verifier()
	buf := make([]byte, 1<<20)
	n, err := resp.Body.Read(buf)
	ttfb := time.Since(start)
	v.Write(buf[:n])
	rest, err2 := io.CopyBuffer(v, resp.Body, buf)
	if (err != nil && err != io.EOF) || err2 != nil || !v.Verified() {
		tb.Fatalf("GET %s: %v %v verified=%v", url, err, err2, v.Verified())
	}
	return pull{total: time.Since(start), ttfb: ttfb, bytes: int64(n) + rest}
}

// procStatus reads a field of /proc/<pid>/status in KiB.
func procStatus(tb testing.TB, pid int, field string) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		tb.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			n, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return n
		}
	}
	tb.Fatalf("no %s in /proc/%d/status", field, pid)
	return 0
}

func mbps(bytes int64, d time.Duration) float64 { return float64(bytes) / d.Seconds() / 1e6 }

// BenchmarkMirror measures one blob through the proxy binary and straight
// from the same upstream, side by side in each iteration:
//
//   - paced: upstream at 50 MB/s a connection, as object storage behind
//     real registries; proxy cold vs direct (pieces in parallel)
//   - unpaced: in-memory upstream on loopback; proxy cold vs direct (the
//     proxy's own cost per byte) and proxy warm vs direct
//   - the proxy's peak RSS growth while serving cold, and time to first byte.
func BenchmarkMirror(b *testing.B) {
	size, err := units.RAMInBytes(*benchSize)
	if err != nil {
		b.Fatal(err)
	}
	reg, err := testregistry.Start(testregistry.Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer reg.Close()
	ds, err := reg.PushBlob(context.Background(), "bench/blob", testregistry.RandomBytes(size, 1))
	if err != nil {
		b.Fatal(err)
	}
	d := digest.Digest(ds)
	direct := reg.URL + "/v2/bench/blob/blobs/" + ds
	via := func(p *proxy) string { return "http://" + p.Addr + "/v2/bench/blob/blobs/" + ds + "?ns=bench.invalid" }
	args := []string{"--upstream", "bench.invalid=" + reg.URL, "--log-level", "info"}

	var pacedX, coldX, warmX, rssMiB, ttfbMs, coldMBps, warmMBps, directMBps float64
	for i := 0; i < b.N; i++ {
		reg.SetPace(50e6)
		dPaced := timedPull(b, direct, d)
		px := startProxy(b, b.TempDir(), args...)
		rss0 := procStatus(b, px.cmd.Process.Pid, "VmRSS")
		cPaced := timedPull(b, via(px), d)
		hwm := procStatus(b, px.cmd.Process.Pid, "VmHWM")
		px.stopProxy()

		reg.SetPace(0)
		dFast := timedPull(b, direct, d)
		px2 := startProxy(b, b.TempDir(), args...)
		cFast := timedPull(b, via(px2), d)
		wFast := timedPull(b, via(px2), d)
		px2.stopProxy()

		pacedX += dPaced.total.Seconds() / cPaced.total.Seconds()
		coldX += dFast.total.Seconds() / cFast.total.Seconds()
		warmX += dFast.total.Seconds() / wFast.total.Seconds()
		rssMiB += float64(hwm-rss0) / 1024
		ttfbMs += float64(cPaced.ttfb.Microseconds()) / 1000
		coldMBps += mbps(size, cFast.total)
		warmMBps += mbps(size, wFast.total)
		directMBps += mbps(size, dFast.total)
		b.Logf("size %s | paced 50MB/s/conn: direct %.2fs, proxy cold %.2fs (ttfb %v) | unpaced: direct %.2fs (%.0f MB/s), proxy cold %.2fs (%.0f MB/s, ttfb %v), proxy warm %.2fs (%.0f MB/s) | proxy RSS %d KiB -> peak %d KiB",
			units.BytesSize(float64(size)), dPaced.total.Seconds(), cPaced.total.Seconds(), cPaced.ttfb.Round(time.Millisecond),
			dFast.total.Seconds(), mbps(size, dFast.total), cFast.total.Seconds(), mbps(size, cFast.total), cFast.ttfb.Round(time.Millisecond),
			wFast.total.Seconds(), mbps(size, wFast.total), rss0, hwm)
	}
	n := float64(b.N)
	b.ReportMetric(pacedX/n, "paced-cold/direct")
	b.ReportMetric(coldX/n, "unpaced-cold/direct")
	b.ReportMetric(warmX/n, "warm/direct")
	b.ReportMetric(rssMiB/n, "rss-growth-MiB")
	b.ReportMetric(ttfbMs/n, "ttfb-cold-ms")
	b.ReportMetric(coldMBps/n, "cold-MB/s")
	b.ReportMetric(warmMBps/n, "warm-MB/s")
	b.ReportMetric(directMBps/n, "direct-MB/s")
	b.ReportMetric(0, "ns/op")
}
