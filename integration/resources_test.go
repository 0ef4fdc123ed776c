package integration

import (
	"context"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/docker/go-units"
	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/internal/report"
)

var (
	resClients = flag.Int("res-clients", 4, "BenchmarkNodeResources: containerds pulling the image through the measured node at once")
	resRuns    = flag.Int("res-runs", 3, "BenchmarkNodeResources: repetitions, each on a fresh cluster")
	resIdle    = flag.Duration("res-idle", time.Minute, "BenchmarkNodeResources: how long the nodes are measured idle, before and after the pulls")
	resLayers  = flag.String("res-layers", "64KiB,8MiB,192MiB", "BenchmarkNodeResources: the image's layers")
)

// userHZ is the unit of /proc/<pid>/stat's times: USER_HZ, 100 on every
// Linux architecture Go supports.
const userHZ = 100

// procUsage is what /proc says about one process, and the disk its data
// dir takes.
type procUsage struct {
	rssKiB, hwmKiB int64
	cpuSecs        float64 // user + system since start
	fds, threads   int
	diskBytes      int64 // allocated blocks under the data dir
}

// readUsage reads pid's /proc entries and measures dataDir.
func readUsage(pid int, dataDir string) (procUsage, error) {
	var u procUsage
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return u, err
	}
	for _, line := range strings.Split(string(st), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		n, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
		switch k {
		case "VmRSS":
			u.rssKiB = n
		case "VmHWM":
			u.hwmKiB = n
		case "Threads":
			u.threads = int(n)
		}
	}
	c, err := readProcCPU(pid)
	if err != nil {
		return u, err
	}
	u.cpuSecs = c.seconds()
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return u, err
	}
	u.fds = len(fds)
	err = filepath.WalkDir(dataDir, func(_ string, e fs.DirEntry, err error) error {
		if err != nil {
			// A partial file renamed or removed while walking.
			return nil
		}
		if fi, err := e.Info(); err == nil {
			if s, ok := fi.Sys().(*syscall.Stat_t); ok {
				u.diskBytes += s.Blocks * 512
			}
		}
		return nil
	})
	return u, err
}

// peakSampler samples processes every 100 ms and keeps each one's peaks.
type peakSampler struct {
	mu    sync.Mutex
	peaks []procUsage
	err   error
}

func samplePeaks(ctx context.Context, pids []int, dirs []string) (*peakSampler, func()) {
	s := &peakSampler{peaks: make([]procUsage, len(pids))}
	done := make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			for i, pid := range pids {
				u, err := readUsage(pid, dirs[i])
				s.mu.Lock()
				if err != nil && s.err == nil {
					s.err = err
				}
				p := &s.peaks[i]
				p.rssKiB, p.hwmKiB = max(p.rssKiB, u.rssKiB), max(p.hwmKiB, u.hwmKiB)
				p.fds, p.threads = max(p.fds, u.fds), max(p.threads, u.threads)
				p.diskBytes = max(p.diskBytes, u.diskBytes)
				s.mu.Unlock()
			}
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
	}()
	return s, func() { <-done }
}

// resNode is one node's figures in one run.
type resNode struct {
	idle, idleAfter   procUsage
	idleCPUMilli      float64 // CPU over the idle window, millicores
	idleAfterCPUMilli float64
	pullCPUSecs       float64
	peak              procUsage
	diskAfter         int64
}

// BenchmarkNodeResources: `make bench-resources` (root). A cluster of three
// nodes on loopback (cluster secret, as the chart runs them); each node's
// RSS, CPU, open fds, threads and data-dir disk from /proc: idle after
// start (res-idle), while res-clients containerd 2.x daemons (one each, own
// roots) pull an image of res-layers through node-0 at once, and idle
// again after. node-0 serves the pulls; every node fetches the pieces of
// the digests it owns from the upstream for the others.
func BenchmarkNodeResources(b *testing.B) {
	needRoot(b)
	var files []int64
	for _, f := range strings.Split(*resLayers, ",") {
		n, err := units.RAMInBytes(strings.TrimSpace(f))
		if err != nil {
			b.Fatalf("-res-layers: %v", err)
		}
		files = append(files, n)
	}
	reg := startRegistry(b)
	img, err := reg.PushImage(context.Background(), imageRepo, imageTag, files, 13)
	if err != nil {
		b.Fatal(err)
	}
	ref := mirroredRegistry + "/" + imageRepo + ":" + imageTag
	v := containerds[len(containerds)-1]
	ids := []string{"node-0", "node-1", "node-2"}
	var runs [][]resNode
	var pullSecs []float64
	for rep := range *resRuns {
		c := newCluster(b, reg, ids)
		for i := range ids {
			c.nodes = append(c.nodes, c.startNode(b, i, "--upstream", mirroredRegistry+"="+reg.URL, "--log-level", "info"))
		}
		c.waitMembers(b, len(ids))
		pids := make([]int, len(ids))
		dirs := make([]string, len(ids))
		for i, p := range c.nodes {
			pids[i], dirs[i] = p.cmd.Process.Pid, p.DataDir
		}
		usage := func() []procUsage {
			out := make([]procUsage, len(pids))
			for i := range pids {
				u, err := readUsage(pids[i], dirs[i])
				if err != nil {
					b.Fatal(err)
				}
				out[i] = u
			}
			return out
		}
		// idle measures the nodes over res-idle: nothing to wait on but
		// the clock, which is the measurement.
		idle := func() (end []procUsage, milli []float64) {
			start := usage()
			t0 := time.Now()
			<-time.After(*resIdle)
			end = usage()
			secs := time.Since(t0).Seconds()
			for i := range end {
				milli = append(milli, (end[i].cpuSecs-start[i].cpuSecs)/secs*1000)
			}
			return end, milli
		}
		nodes := make([]resNode, len(ids))
		idleEnd, idleMilli := idle()
		for i := range nodes {
			nodes[i].idle, nodes[i].idleCPUMilli = idleEnd[i], idleMilli[i]
		}

		var ctds []*containerdEnv
		for range *resClients {
			ctds = append(ctds, startContainerd(b, v, c.nodes[0].Addr))
		}
		before := usage()
		ctx, stop := context.WithCancel(context.Background())
		sampler, wait := samplePeaks(ctx, pids, dirs)
		t0 := time.Now()
		errs := make([]error, len(ctds))
		var wg sync.WaitGroup
		for k, ctd := range ctds {
			wg.Add(1)
			go func() {
				defer wg.Done()
				out, err := run(b, 10*time.Minute, ctd.ctr, "--address", ctd.sock, "--namespace", "rptest",
					"images", "pull", "--hosts-dir", ctd.hosts, "--snapshotter", "native", ref)
				if err != nil {
					errs[k] = fmt.Errorf("%w: %s", err, tail(out, 2000))
				}
			}()
		}
		wg.Wait()
		took := time.Since(t0).Seconds()
		// Until every node has committed what it fetched: the disk figure
		// after is the store's, not a partial's.
		for _, d := range imageBlobs(img) {
			waitComplete(b, c.nodes[0], digest.Digest(d))
		}
		stop()
		wait()
		for _, err := range errs {
			if err != nil {
				b.Fatalf("a pull through node-0 failed: %v", err)
			}
		}
		if sampler.err != nil {
			b.Fatal(sampler.err)
		}
		after := usage()
		for i := range nodes {
			nodes[i].pullCPUSecs = after[i].cpuSecs - before[i].cpuSecs
			nodes[i].peak = sampler.peaks[i]
			nodes[i].diskAfter = after[i].diskBytes
		}
		for _, ctd := range ctds {
			ctd.discard()
		}
		idleEnd, idleMilli = idle()
		for i := range nodes {
			nodes[i].idleAfter, nodes[i].idleAfterCPUMilli = idleEnd[i], idleMilli[i]
		}
		for i, n := range nodes {
			b.Logf("run %d %s: idle RSS %.1f MiB, %.1f millicores, %d fds, %d threads, disk %s | %d pulls of %s through node-0 in %.1fs: CPU %.2f s, peak RSS %.1f MiB (VmHWM %.1f), peak fds %d, peak threads %d, disk peak %s, after %s | idle after: RSS %.1f MiB (VmHWM over the run %.1f), %.1f millicores, %d fds",
				rep+1, ids[i], kibToMiB(n.idle.rssKiB), n.idleCPUMilli, n.idle.fds, n.idle.threads, units.BytesSize(float64(n.idle.diskBytes)),
				*resClients, units.BytesSize(float64(img.LayerBytes())), took, n.pullCPUSecs, kibToMiB(n.peak.rssKiB), kibToMiB(n.peak.hwmKiB), n.peak.fds, n.peak.threads,
				units.BytesSize(float64(n.peak.diskBytes)), units.BytesSize(float64(n.diskAfter)),
				kibToMiB(n.idleAfter.rssKiB), kibToMiB(n.idleAfter.hwmKiB), n.idleAfterCPUMilli, n.idleAfter.fds)
		}
		for _, p := range c.nodes {
			p.stopProxy()
		}
		runs = append(runs, nodes)
		pullSecs = append(pullSecs, took)
	}
	// Median and worst over the runs of node-0 (the pulls' node) and of the
	// busiest other node in each run.
	pick := func(f func(resNode) float64, others bool) (med, worst float64) {
		var v []float64
		for _, nodes := range runs {
			if !others {
				v = append(v, f(nodes[0]))
				continue
			}
			var m float64
			for _, n := range nodes[1:] {
				m = max(m, f(n))
			}
			v = append(v, m)
		}
		return report.MedianOf(v), slices.Max(v)
	}
	type metric struct {
		name string
		f    func(resNode) float64
	}
	metrics := []metric{
		{"idle-rss-MiB", func(n resNode) float64 { return kibToMiB(n.idle.rssKiB) }},
		{"idle-millicores", func(n resNode) float64 { return n.idleCPUMilli }},
		{"idle-fds", func(n resNode) float64 { return float64(n.idle.fds) }},
		{"idle-threads", func(n resNode) float64 { return float64(n.idle.threads) }},
		{"pull-cpu-s", func(n resNode) float64 { return n.pullCPUSecs }},
		{"pull-peak-rss-MiB", func(n resNode) float64 { return kibToMiB(n.peak.rssKiB) }},
		{"pull-peak-fds", func(n resNode) float64 { return float64(n.peak.fds) }},
		{"pull-peak-threads", func(n resNode) float64 { return float64(n.peak.threads) }},
		{"pull-peak-disk-MiB", func(n resNode) float64 { return float64(n.peak.diskBytes) / (1 << 20) }},
		{"disk-after-MiB", func(n resNode) float64 { return float64(n.diskAfter) / (1 << 20) }},
		{"after-rss-MiB", func(n resNode) float64 { return kibToMiB(n.idleAfter.rssKiB) }},
		// The kernel's high-water mark of the resident set over the whole
		// run: start, idle, the pulls and the idle after them.
		{"run-peak-rss-MiB", func(n resNode) float64 { return kibToMiB(n.idleAfter.hwmKiB) }},
		{"after-millicores", func(n resNode) float64 { return n.idleAfterCPUMilli }},
	}
	var rows []string
	for _, m := range metrics {
		m0, w0 := pick(m.f, false)
		m1, w1 := pick(m.f, true)
		b.ReportMetric(m0, "node0-"+m.name)
		b.ReportMetric(m1, "other-"+m.name)
		rows = append(rows, fmt.Sprintf("| %s | %.1f / %.1f | %.1f / %.1f |", m.name, m0, w0, m1, w1))
	}
	b.ReportMetric(report.MedianOf(pullSecs), "pull-s")
	b.ReportMetric(0, "ns/op")
	b.Logf("%d runs; %d containerd 2.x pulls of %s (%s) at once through node-0, %.1f s median (worst %.1f); idle windows %v\n| figure | node-0: median / worst | busiest other node: median / worst |\n|---|---|---|\n%s",
		*resRuns, *resClients, *resLayers, units.BytesSize(float64(img.LayerBytes())), report.MedianOf(pullSecs), slices.Max(pullSecs), *resIdle, strings.Join(rows, "\n"))
}

func kibToMiB(kib int64) float64 { return float64(kib) / 1024 }
