package integration

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/docker/go-units"
	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/internal/fetch"
	"github.com/registry-proxy/registry-proxy/internal/testregistry"
	"github.com/registry-proxy/registry-proxy/p2p/owner"
)

var benchSize = flag.String("bench-size", "1GiB", "blob size for BenchmarkMirror")

func timedPull(tb testing.TB, url string, d digest.Digest) fetch.Result {
	tb.Helper()
	r, err := fetch.Blob(context.Background(), http.DefaultClient, url, d)
	if err != nil {
		tb.Fatal(err)
	}
	return r
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

// waitComplete waits until the proxy has committed blob d.
func waitComplete(tb testing.TB, p *proxy, d digest.Digest) {
	tb.Helper()
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		resp, err := http.Get("http://" + p.Admin + "/debug/blobs/" + d.String())
		if err == nil {
			var st struct{ State string }
			json.NewDecoder(resp.Body).Decode(&st)
			resp.Body.Close()
			if st.State == "complete" || st.State == "cached" {
				return
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	tb.Fatalf("blob %s not committed within a minute", d)
}

func mbps(bytes int64, d time.Duration) float64 { return float64(bytes) / d.Seconds() / 1e6 }

// cpuSeconds runs f and returns how many CPU-seconds the whole machine was
// busy meanwhile (every process and the kernel: client, upstream, proxy).
func cpuSeconds(f func()) float64 {
	busy0, total0 := cpuTimes()
	start := time.Now()
	f()
	wall := time.Since(start).Seconds()
	busy1, total1 := cpuTimes()
	if total1 <= total0 {
		return 0
	}
	return float64(busy1-busy0) / float64(total1-total0) * float64(runtime.NumCPU()) * wall
}

// warmPairs is how many warm and direct pulls BenchmarkMirror alternates.
const warmPairs = 4

// BenchmarkMirror measures one blob through the proxy binary and straight
// from the same upstream, side by side in each iteration:
//
//   - paced: upstream at 50 MB/s a connection, as object storage behind
//     real registries; proxy cold vs direct (pieces in parallel)
//   - unpaced: in-memory upstream on loopback; proxy cold vs direct (the
//     proxy's own cost per byte) and proxy warm vs direct (warmPairs
//     pairs, alternating which goes first)
//   - the proxy's peak RSS growth while serving cold, and time to first byte
//   - where the unpaced cold time goes: the machine's CPU-seconds during it
//     and during the direct download, and the ratio the machine's cores
//     would allow if the cold download kept every one of them busy.
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

	// Each measurement starts on a quiet disk: the previous one's dirty
	// pages written back, its commit done.
	quiesce := func(p *proxy) {
		if p != nil {
			waitComplete(b, p, d)
		}
		syscall.Sync()
	}
	var pacedX, coldX, warmX, rssMiB, ttfbMs, coldMBps, warmMBps, directMBps, coldCPU, directCPU, ceilingX float64
	for i := 0; i < b.N; i++ {
		reg.SetPace(50e6)
		quiesce(nil)
		dPaced := timedPull(b, direct, d)
		px := startProxy(b, b.TempDir(), args...)
		rss0 := procStatus(b, px.cmd.Process.Pid, "VmRSS")
		cPaced := timedPull(b, via(px), d)
		hwm := procStatus(b, px.cmd.Process.Pid, "VmHWM")
		quiesce(px)
		px.stopProxy()

		reg.SetPace(0)
		quiesce(nil)
		var dFast, cFast fetch.Result
		dCPU := cpuSeconds(func() { dFast = timedPull(b, direct, d) })
		px2 := startProxy(b, b.TempDir(), args...)
		quiesce(nil)
		cCPU := cpuSeconds(func() { cFast = timedPull(b, via(px2), d) })
		quiesce(px2)
		// Warm against direct in alternating pairs, each order as often:
		// both are about as fast as the client can hash, so one pull of
		// each seconds apart measures the machine's drift more than the
		// proxy.
		var dWarm, wWarm time.Duration
		for k := range warmPairs {
			if k%2 == 0 {
				dWarm += timedPull(b, direct, d).Total
				wWarm += timedPull(b, via(px2), d).Total
			} else {
				wWarm += timedPull(b, via(px2), d).Total
				dWarm += timedPull(b, direct, d).Total
			}
		}
		px2.stopProxy()

		pacedX += dPaced.Total.Seconds() / cPaced.Total.Seconds()
		coldX += dFast.Total.Seconds() / cFast.Total.Seconds()
		warmX += dWarm.Seconds() / wWarm.Seconds()
		rssMiB += float64(hwm-rss0) / 1024
		ttfbMs += float64(cPaced.TTFB.Microseconds()) / 1000
		coldMBps += mbps(size, cFast.Total)
		warmMBps += mbps(size*warmPairs, wWarm)
		directMBps += mbps(size, dFast.Total)
		coldCPU += cCPU
		directCPU += dCPU
		var ceiling float64 // 0: /proc/stat unreadable
		if cCPU > 0 {
			ceiling = dFast.Total.Seconds() / (cCPU / float64(runtime.NumCPU()))
		}
		ceilingX += ceiling
		b.Logf("unpaced CPU-seconds (whole machine, %d cores): direct %.2f, proxy cold %.2f: the cores allow cold/direct %.2f at most", runtime.NumCPU(), dCPU, cCPU, ceiling)
		b.Logf("size %s | paced 50MB/s/conn: direct %.2fs, proxy cold %.2fs (ttfb %v) | unpaced: direct %.2fs (%.0f MB/s), proxy cold %.2fs (%.0f MB/s, ttfb %v), proxy warm %.2fs (%.0f MB/s, mean of %d) | proxy RSS %d KiB -> peak %d KiB",
			units.BytesSize(float64(size)), dPaced.Total.Seconds(), cPaced.Total.Seconds(), cPaced.TTFB.Round(time.Millisecond),
			dFast.Total.Seconds(), mbps(size, dFast.Total), cFast.Total.Seconds(), mbps(size, cFast.Total), cFast.TTFB.Round(time.Millisecond),
			wWarm.Seconds()/warmPairs, mbps(size*warmPairs, wWarm), warmPairs, rss0, hwm)
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
	b.ReportMetric(coldCPU/n, "cold-cpu-s")
	b.ReportMetric(directCPU/n, "direct-cpu-s")
	b.ReportMetric(ceilingX/n, "cpu-ceiling-cold/direct")
	b.ReportMetric(0, "ns/op")
}

// BenchmarkWarmAccessCheck pulls one image (its manifest by digest and every
// layer) again and again from two proxies on the same upstream, one with
// access.check on and one with it off, alternating in each iteration. Both
// hold everything already; within access.ttl the check's answers are
// remembered, so it should cost next to nothing.
func BenchmarkWarmAccessCheck(b *testing.B) {
	reg, err := testregistry.Start(testregistry.Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer reg.Close()
	sizes := []int64{16 << 10, 16 << 10, 16 << 10, 16 << 10, 256 << 10, 256 << 10, 4 << 20, 4 << 20, 32 << 20}
	img, err := reg.PushImage(context.Background(), "bench/app", "v1", sizes, 3)
	if err != nil {
		b.Fatal(err)
	}
	base := []string{"--upstream", "bench.invalid=" + reg.URL, "--log-level", "info"}
	on := startProxy(b, b.TempDir(), base...)
	off := startProxy(b, b.TempDir(), append(base, "--config", writeTOML(b, "[access]\ncheck = false\n"))...)
	pull := func(p *proxy) time.Duration {
		start := time.Now()
		for _, u := range append([]string{"/v2/bench/app/manifests/" + img.Digest}, layerPaths(img)...) {
			resp, err := http.Get("http://" + p.Addr + u + "?ns=bench.invalid")
			if err != nil {
				b.Fatal(err)
			}
			n, _ := io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 || n == 0 {
				b.Fatalf("%s: %d, %d bytes", u, resp.StatusCode, n)
			}
		}
		return time.Since(start)
	}
	// Cold, then once more so every blob is committed and every answer known.
	for _, p := range []*proxy{on, off} {
		pull(p)
		for _, l := range img.Layers {
			waitComplete(b, p, digest.Digest(l.Digest))
		}
		pull(p)
	}
	const rounds = 20
	var tOn, tOff time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for r := 0; r < rounds; r++ {
			if r%2 == 0 {
				tOn += pull(on)
				tOff += pull(off)
			} else {
				tOff += pull(off)
				tOn += pull(on)
			}
		}
	}
	pulls := float64(b.N * rounds)
	b.ReportMetric(tOn.Seconds()/tOff.Seconds(), "check-on/off")
	b.ReportMetric(float64(tOn.Microseconds())/pulls/1000, "ms/pull-on")
	b.ReportMetric(float64(tOff.Microseconds())/pulls/1000, "ms/pull-off")
	b.ReportMetric(0, "ns/op")
}

func layerPaths(img *testregistry.Image) []string {
	var out []string
	for _, l := range img.Layers {
		out = append(out, "/v2/bench/app/blobs/"+l.Digest)
	}
	return out
}

// BenchmarkLoad runs the load of TestLoad (proxy package) against the
// binary: 500 clients at once on one cold 64 MiB blob and 50 other cold
// 1 MiB blobs, every response verified, and reports the proxy process's
// peak RSS growth and the upstream's copies.
func BenchmarkLoad(b *testing.B) {
	var rssSum, copiesSum, secsSum float64
	for i := 0; i < b.N; i++ {
		reg, err := testregistry.Start(testregistry.Options{})
		if err != nil {
			b.Fatal(err)
		}
		ctx := context.Background()
		big, err := reg.PushBlob(ctx, "load/blob", testregistry.RandomBytes(64<<20, 7))
		if err != nil {
			b.Fatal(err)
		}
		var small []string
		for j := 0; j < 50; j++ {
			d, err := reg.PushBlob(ctx, "load/blob", testregistry.RandomBytes(1<<20, uint64(1000+j)))
			if err != nil {
				b.Fatal(err)
			}
			small = append(small, d)
		}
		reg.ResetCounters()
		px := startProxy(b, b.TempDir(), "--upstream", "load.invalid="+reg.URL, "--log-level", "info",
			"--config", writeTOML(b, "[limits]\nclient_conns = 1024\n"))
		rss0 := procStatus(b, px.cmd.Process.Pid, "VmRSS")
		client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 600}}
		url := func(d string) fetch.Target {
			return fetch.Target{URL: "http://" + px.Addr + "/v2/load/blob/blobs/" + d + "?ns=load.invalid", Digest: digest.Digest(d)}
		}
		var targets []fetch.Target
		for range 500 {
			targets = append(targets, url(big))
		}
		for _, d := range small {
			targets = append(targets, url(d))
		}
		took, errs := fetch.All(ctx, client, targets)
		hwm := procStatus(b, px.cmd.Process.Pid, "VmHWM")
		client.CloseIdleConnections()
		if len(errs) > 0 {
			b.Fatalf("%d responses failed, the first: %v", len(errs), errs[0])
		}
		copies := float64(reg.BlobBytes()) / float64(64<<20+50<<20)
		b.Logf("500 clients x 64 MiB + 50 x 1 MiB: %v, proxy RSS %d -> peak %d KiB, upstream %.3f copies", took.Round(time.Millisecond), rss0, hwm, copies)
		rssSum += float64(hwm-rss0) / 1024
		copiesSum += copies
		secsSum += took.Seconds()
		px.stopProxy()
		reg.Close()
	}
	n := float64(b.N)
	b.ReportMetric(rssSum/n, "rss-growth-MiB")
	b.ReportMetric(copiesSum/n, "upstream-copies")
	b.ReportMetric(secsSum/n, "s")
	b.ReportMetric(0, "ns/op")
}

// BenchmarkPeerTransfer measures what the cluster's mutual TLS costs a
// transfer between peers: node B pulls a blob that node A holds (every
// byte from A), with the cluster secret and with p2p.insecure, side by side.
func BenchmarkPeerTransfer(b *testing.B) {
	size, err := units.RAMInBytes(*benchSize)
	if err != nil {
		b.Fatal(err)
	}
	var secs = map[string]float64{}
	for i := 0; i < b.N; i++ {
		// Each order as often: on a VM whose host takes back freed memory,
		// the second mode writes into pages the first freed, first touched
		// again, and pays for it in system time.
		modes := []string{"tls", "insecure"}
		if i%2 == 1 {
			slices.Reverse(modes)
		}
		for _, mode := range modes {
			reg := startRegistry(b)
			d := pushBlob(b, reg, size, 61)
			ids := []string{"node-a", "node-b"}
			c := newCluster(b, reg, ids)
			var extra []string
			if mode == "insecure" {
				c.secret = ""
				extra = []string{"--config", writeTOML(b, "[p2p]\ninsecure = true\n")}
			}
			own := owner.Rank(d, ids)[0]
			for j := range ids {
				c.nodes = append(c.nodes, c.startNode(b, j, append(extra, "--log-level", "info")...))
			}
			c.waitMembers(b, 2)
			src, dst := 0, 1
			if ids[1] == own {
				src, dst = 1, 0
			}
			if _, err := fetchVerified(c.url(src, "cluster/blob", d), d); err != nil {
				b.Fatal(err)
			}
			waitComplete(b, c.nodes[src], digest.Digest(d))
			syscall.Sync()
			start := time.Now()
			if _, err := fetchVerified(c.url(dst, "cluster/blob", d), d); err != nil {
				b.Fatal(err)
			}
			took := time.Since(start)
			st := stats(b, c.nodes[dst], d)
			b.Logf("%s: %s from the peer in %v (%.0f MB/s), sources %v", mode, units.BytesSize(float64(size)), took.Round(time.Millisecond), mbps(size, took), st.Sources)
			secs[mode] += took.Seconds()
			for _, n := range c.nodes {
				n.stopProxy()
			}
		}
	}
	b.ReportMetric(secs["insecure"]/secs["tls"], "tls-speed/insecure")
	b.ReportMetric(float64(size)*float64(b.N)/secs["tls"]/1e6, "tls-MB/s")
	b.ReportMetric(float64(size)*float64(b.N)/secs["insecure"]/1e6, "insecure-MB/s")
	b.ReportMetric(0, "ns/op")
}

// BenchmarkServePeers: nine nodes on loopback pull one cold blob at once;
// the digest's owner reads it from the upstream while it serves the other
// eight and its own client. Reports the owner's peak RSS (and its growth
// from start) and the time for all nine.
func BenchmarkServePeers(b *testing.B) {
	size, err := units.RAMInBytes(*benchSize)
	if err != nil {
		b.Fatal(err)
	}
	var peak, growth, secs float64
	for range b.N {
		reg := startRegistry(b)
		d := pushBlob(b, reg, size, 71)
		var ids []string
		for i := range 9 {
			ids = append(ids, fmt.Sprintf("node-%d", i))
		}
		own := slices.Index(ids, owner.Rank(d, ids)[0])
		c := newCluster(b, reg, ids)
		for j := range ids {
			c.nodes = append(c.nodes, c.startNode(b, j, "--log-level", "info"))
		}
		c.waitMembers(b, len(ids))
		pid := c.nodes[own].cmd.Process.Pid
		rss0 := procStatus(b, pid, "VmRSS")
		var targets []fetch.Target
		for j := range ids {
			targets = append(targets, fetch.Target{URL: c.url(j, "cluster/blob", d), Digest: digest.Digest(d)})
		}
		took, errs := fetch.All(context.Background(), http.DefaultClient, targets)
		if len(errs) > 0 {
			b.Fatalf("%d pulls failed, the first: %v", len(errs), errs[0])
		}
		hwm := procStatus(b, pid, "VmHWM")
		st := stats(b, c.nodes[own], d)
		b.Logf("9 nodes, %s cold: %v; the owner (%s, sources %v) RSS %d KiB at start, peak %d KiB; upstream %.3f copies",
			units.BytesSize(float64(size)), took.Round(time.Millisecond), ids[own], st.Sources, rss0, hwm, float64(reg.BlobBytes())/float64(size))
		peak += float64(hwm) / 1024
		growth += float64(hwm-rss0) / 1024
		secs += took.Seconds()
		for _, n := range c.nodes {
			n.stopProxy()
		}
	}
	n := float64(b.N)
	b.ReportMetric(peak/n, "owner-peak-rss-MiB")
	b.ReportMetric(growth/n, "owner-rss-growth-MiB")
	b.ReportMetric(secs/n, "s")
	b.ReportMetric(0, "ns/op")
}
