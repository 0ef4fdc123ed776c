package integration

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/docker/go-units"
	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/internal/fetch"
	"github.com/registry-proxy/registry-proxy/internal/ports"
	"github.com/registry-proxy/registry-proxy/p2p/owner"
)

// cpuTime is a process's CPU time, user and system apart.
type cpuTime struct{ user, sys time.Duration }

func (c cpuTime) sub(o cpuTime) cpuTime { return cpuTime{c.user - o.user, c.sys - o.sys} }
func (c cpuTime) seconds() float64      { return (c.user + c.sys).Seconds() }

// sumCPU is the CPU time of every running process of cmds.
func sumCPU(tb testing.TB, cmds []*exec.Cmd) cpuTime {
	tb.Helper()
	var sum cpuTime
	for _, c := range cmds {
		if c.Process == nil || c.ProcessState != nil {
			continue
		}
		t := procCPU(tb, c.Process.Pid)
		sum.user += t.user
		sum.sys += t.sys
	}
	return sum
}

// procCPU reads a process's CPU time (every thread) from /proc/PID/stat.
func procCPU(tb testing.TB, pid int) cpuTime {
	tb.Helper()
	c, err := readProcCPU(pid)
	if err != nil {
		tb.Fatal(err)
	}
	return c
}

// readProcCPU is procCPU returning its error. Linux counts CPU time in
// USER_HZ ticks, 100 a second on every architecture the project builds for.
func readProcCPU(pid int) (cpuTime, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return cpuTime{}, err
	}
	// The command name may hold spaces: fields count from after its ")".
	// f[0] is field 3 (state): utime is field 14, stime 15.
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	if len(f) < 13 {
		return cpuTime{}, fmt.Errorf("/proc/%d/stat: %q", pid, b)
	}
	u, err1 := strconv.ParseInt(f[11], 10, 64)
	s, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return cpuTime{}, fmt.Errorf("/proc/%d/stat: %q", pid, b)
	}
	const tick = time.Second / userHZ
	return cpuTime{time.Duration(u) * tick, time.Duration(s) * tick}, nil
}

// selfCPU is this process's CPU time: the client's, in the benchmark below.
func selfCPU() cpuTime {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return cpuTime{time.Duration(ru.Utime.Nano()), time.Duration(ru.Stime.Nano())}
}

// cpuMeter sums CPU-seconds per GiB and throughput of one path over the
// benchmark's iterations.
type cpuMeter struct {
	user, sys, secs float64
	bytes           int64
}

func (m *cpuMeter) add(c cpuTime, took time.Duration, bytes int64) {
	m.user += c.user.Seconds()
	m.sys += c.sys.Seconds()
	m.secs += took.Seconds()
	m.bytes += bytes
}

func (m *cpuMeter) perGiB() (user, sys float64) {
	gib := float64(m.bytes) / (1 << 30)
	return m.user / gib, m.sys / gib
}

func (m *cpuMeter) mbps() float64 { return float64(m.bytes) / m.secs / 1e6 }

// childRegistry is cmd/testregistry in a process of its own, so that the
// CPU of the client (this process) and of the upstream are counted apart.
type childRegistry struct {
	cmd     *exec.Cmd
	URL     string
	Digest  digest.Digest
	Size    int64
	control string
}

func startChildRegistry(tb testing.TB, size int64, seed uint64) *childRegistry {
	tb.Helper()
	control, err := ports.FreePair("127.0.0.1")
	if err != nil {
		tb.Fatal(err)
	}
	cmd := exec.Command(*regBin, "--listen", "127.0.0.1:0", "--stats-listen", "127.0.0.1:0",
		"--control", control, "--blob", fmt.Sprint(size), "--seed", fmt.Sprint(seed))
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		tb.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	var info struct {
		Digest string
		Size   int64
		URL    string
	}
	if err := json.NewDecoder(bufio.NewReader(out)).Decode(&info); err != nil {
		tb.Fatalf("testregistry: %v", err)
	}
	go io.Copy(io.Discard, out)
	return &childRegistry{cmd: cmd, URL: info.URL, Digest: digest.Digest(info.Digest), Size: info.Size, control: "http://" + control}
}

func (r *childRegistry) setPace(tb testing.TB, bps int64) {
	tb.Helper()
	resp, err := http.Post(fmt.Sprintf("%s/pace?bps=%d", r.control, bps), "", nil)
	if err != nil {
		tb.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		tb.Fatalf("testregistry pace: %s", resp.Status)
	}
}

// distributionProxy is distribution's registry (Debian's docker-registry)
// in pull-through cache mode in front of upstream: the anchor a node-local
// mirror is compared with.
type distributionProxy struct {
	cmd  *exec.Cmd
	Addr string
}

func startDistributionProxy(tb testing.TB, upstream string) *distributionProxy {
	tb.Helper()
	bin, err := exec.LookPath("docker-registry")
	need(tb, err == nil, "Debian's docker-registry (distribution 2.8) is not installed")
	addr, err := ports.FreePair("127.0.0.1")
	if err != nil {
		tb.Fatal(err)
	}
	dir := tb.TempDir()
	cfg := filepath.Join(dir, "config.yml")
	body := fmt.Sprintf(`version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
  redirect:
    disable: true
http:
  addr: %s
proxy:
  remoteurl: %s
`, filepath.Join(dir, "store"), addr, upstream)
	if err := os.WriteFile(cfg, []byte(body), 0o644); err != nil {
		tb.Fatal(err)
	}
	cmd := exec.Command(bin, "serve", cfg)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	logf, err := os.Create(filepath.Join(dir, "log"))
	if err != nil {
		tb.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	tb.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
		logf.Close()
	})
	// Ready when /v2/ answers.
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get("http://" + addr + "/v2/")
		if err == nil {
			resp.Body.Close()
			return &distributionProxy{cmd: cmd, Addr: addr}
		}
		select {
		case <-exited:
			log, _ := os.ReadFile(filepath.Join(dir, "log"))
			tb.Fatalf("docker-registry exited: %s", log)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			tb.Fatalf("docker-registry did not answer on %s within 30 s", addr)
		}
	}
}

// BenchmarkCPUPerByte reports what each path costs in CPU-seconds per GiB
// (user and system, from each process's own accounting) and its
// throughput, side by side in each iteration on one blob (-bench-size):
//
//   - direct: the client (this process: fetch and sha256, as containerd
//     does) reading from the upstream (cmd/testregistry, its own process)
//   - cold and warm through registry-proxy, unpaced and with the upstream
//     paced at 50 MB/s a connection (object storage behind a registry)
//   - cold and warm through distribution's registry in proxy mode
//   - a blob sent by one node to another, with the cluster's mutual TLS
//     and with p2p.insecure: the sender's and the receiver's CPU (the
//     receiver also serves its client)
//
// Every process runs alone on the blob while it is measured; the page cache
// is written back before each measurement.
func BenchmarkCPUPerByte(b *testing.B) {
	size, err := units.RAMInBytes(*benchSize)
	if err != nil {
		b.Fatal(err)
	}
	meters := map[string]*cpuMeter{}
	meter := func(name string) *cpuMeter {
		if meters[name] == nil {
			meters[name] = &cpuMeter{}
		}
		return meters[name]
	}
	// pull fetches url as a client does and adds the CPU of pid (0: this
	// process, the client) to the meter name.
	pull := func(name, url string, d digest.Digest, pid int) {
		b.Helper()
		syscall.Sync()
		read := selfCPU
		if pid != 0 {
			read = func() cpuTime { return procCPU(b, pid) }
		}
		c0 := read()
		r, err := fetch.Blob(context.Background(), http.DefaultClient, url, d)
		if err != nil {
			b.Fatalf("%s: %v", name, err)
		}
		meter(name).add(read().sub(c0), r.Total, size)
	}
	for i := 0; i < b.N; i++ {
		reg := startChildRegistry(b, size, uint64(90+i))
		d := reg.Digest
		blob := "/v2/bench/blob/blobs/" + d.String()
		direct := reg.URL + blob
		for _, paced := range []bool{false, true} {
			suffix := ""
			if paced {
				reg.setPace(b, 50e6)
				suffix = "-paced"
			} else {
				reg.setPace(b, 0)
			}
			pull("direct-client"+suffix, direct, d, 0)
			pull("direct-upstream"+suffix, direct, d, reg.cmd.Process.Pid)

			px := startProxy(b, b.TempDir(), "--upstream", "bench.invalid="+reg.URL, "--log-level", "info")
			via := "http://" + px.Addr + blob + "?ns=bench.invalid"
			pull("proxy-cold"+suffix, via, d, px.cmd.Process.Pid)
			waitComplete(b, px, d)
			pull("proxy-warm"+suffix, via, d, px.cmd.Process.Pid)
			px.stopProxy()

			dp := startDistributionProxy(b, reg.URL)
			viaD := "http://" + dp.Addr + blob
			pull("distribution-cold"+suffix, viaD, d, dp.cmd.Process.Pid)
			pull("distribution-warm"+suffix, viaD, d, dp.cmd.Process.Pid)
			dp.cmd.Process.Kill()
		}
		reg.setPace(b, 0)
		reg.cmd.Process.Kill()
		reg.cmd.Wait()

		// Between peers: node B pulls what node A holds.
		// Each order as often: on a VM whose host takes back freed memory,
		// the second mode writes into pages the first freed, first touched
		// again, and pays for it in system time.
		modes := []string{"tls", "insecure"}
		if i%2 == 1 {
			slices.Reverse(modes)
		}
		for _, mode := range modes {
			r := startRegistry(b)
			pd := digest.Digest(pushBlob(b, r, size, uint64(95+i)))
			ids := []string{"node-a", "node-b"}
			c := newCluster(b, r, ids)
			var extra []string
			if mode == "insecure" {
				c.secret = ""
				extra = []string{"--config", writeTOML(b, "[p2p]\ninsecure = true\n")}
			}
			for j := range ids {
				c.nodes = append(c.nodes, c.startNode(b, j, append(extra, "--log-level", "info")...))
			}
			c.waitMembers(b, 2)
			// The source is the digest's owner: it fetches from the
			// upstream for every node, so the other one holds nothing.
			src, dst := 0, 1
			if ids[1] == owner.Rank(pd.String(), ids)[0] {
				src, dst = 1, 0
			}
			if _, err := fetchVerified(c.url(src, "cluster/blob", pd.String()), pd.String()); err != nil {
				b.Fatal(err)
			}
			waitComplete(b, c.nodes[src], pd)
			syscall.Sync()
			s0, r0 := procCPU(b, c.nodes[src].cmd.Process.Pid), procCPU(b, c.nodes[dst].cmd.Process.Pid)
			res, err := fetch.Blob(context.Background(), http.DefaultClient, c.url(dst, "cluster/blob", pd.String()), pd)
			if err != nil {
				b.Fatal(err)
			}
			s1, r1 := procCPU(b, c.nodes[src].cmd.Process.Pid), procCPU(b, c.nodes[dst].cmd.Process.Pid)
			st := stats(b, c.nodes[dst], pd.String())
			if peerBytes(st) < size/2 {
				b.Fatalf("%s: node %s took %d bytes from its peer, want most of %d: sources %v", mode, ids[dst], peerBytes(st), size, st.Sources)
			}
			meter("peer-send-"+mode).add(s1.sub(s0), res.Total, peerBytes(st))
			meter("peer-receive-"+mode).add(r1.sub(r0), res.Total, size)
			for _, n := range c.nodes {
				n.stopProxy()
			}
		}
	}
	var names []string
	for n := range meters {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		m := meters[n]
		u, s := m.perGiB()
		b.Logf("%-26s %6.2f CPU-s/GiB (user %.2f, sys %.2f)  %7.0f MB/s", n, u+s, u, s, m.mbps())
		b.ReportMetric(u+s, n+"-cpu-s/GiB")
	}
	ratio := func(a, b string) float64 { return meters[a].mbps() / meters[b].mbps() }
	b.ReportMetric(ratio("proxy-cold", "distribution-cold"), "cold-proxy/distribution")
	b.ReportMetric(ratio("proxy-warm", "distribution-warm"), "warm-proxy/distribution")
	b.ReportMetric(ratio("proxy-cold", "direct-client"), "cold-proxy/direct")
	b.ReportMetric(ratio("proxy-warm", "direct-client"), "warm-proxy/direct")
	b.ReportMetric(ratio("distribution-cold", "direct-client"), "cold-distribution/direct")
	b.ReportMetric(ratio("proxy-cold-paced", "direct-client-paced"), "paced-cold-proxy/direct")
	b.ReportMetric(ratio("peer-receive-tls", "peer-receive-insecure"), "peer-tls/insecure")
	b.ReportMetric(0, "ns/op")
}
