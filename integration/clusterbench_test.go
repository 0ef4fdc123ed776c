package integration

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/docker/go-units"

	"github.com/registry-proxy/registry-proxy/config"
	"github.com/registry-proxy/registry-proxy/internal/netlab"
	"github.com/registry-proxy/registry-proxy/internal/probe"
	"github.com/registry-proxy/registry-proxy/internal/report"
	"github.com/registry-proxy/registry-proxy/p2p/owner"
	"github.com/registry-proxy/registry-proxy/piece"
)

// hashCmd prints the sha256 of its input first, at the speed of the
// clients' own check (containerd's Go sha256 uses the CPU's SHA
// instructions): coreutils' sha256sum does about 180 MB/s here, and eight
// of them took a third of a 2-core machine's CPU from the proxies.
const hashCmd = "openssl dgst -sha256 -r"

var (
	cbNodes        = flag.Int("cluster-nodes", 8, "BenchmarkCluster: proxies, one per network namespace")
	cbSize         = flag.String("cluster-size", "256MiB", "BenchmarkCluster: blob size (scenarios a, b, d)")
	cbImage        = flag.String("cluster-image", "128MiB,64MiB,32MiB,32MiB", "BenchmarkCluster: layer sizes of the image of scenario c")
	cbUp           = flag.String("cluster-up", "25MB", "BenchmarkCluster: each node's upload and download, bytes/s")
	cbOrigin       = flag.String("cluster-origin", "25MB", "BenchmarkCluster: the upstream registry's upload, bytes/s")
	cbModes        = flag.String("cluster-modes", "state,fcfs,direct", "BenchmarkCluster: modes to run")
	cbScenarios    = flag.String("cluster-scenarios", "a,b,c,d", "BenchmarkCluster: scenarios to run")
	cbRuns         = flag.Int("cluster-runs", 3, "BenchmarkCluster: repeats of every scenario and mode")
	cbSlow         = flag.Int("cluster-slow", 2, "BenchmarkCluster: scenario b's slow parents")
	cbSlowKind     = flag.String("cluster-slow-kind", "throttle", "BenchmarkCluster: scenario b's slow parents are throttled to 1/10 (throttle) or loaded by background uploads (load)")
	cbCtr          = flag.Int("cluster-ctr", 8, "BenchmarkCluster: scenario c's nodes pulling with containerd (the others with curl)")
	cbContainerd   = flag.String("cluster-containerd", "1.x", "BenchmarkCluster: scenario c's containerd, 1.x (Debian's) or 2.x")
	cbPuller       = flag.String("cluster-puller", "crictl", "BenchmarkCluster: scenario c pulls with crictl (through CRI, as kubelet does) or ctr")
	cbSnapshotter  = flag.String("cluster-snapshotter", "overlayfs", "BenchmarkCluster: scenario c's containerd snapshotter: overlayfs (containerd's and kubelet's default) or native (copies every layer's files into each snapshot above it)")
	cbWaves        = flag.Int("cluster-waves", 3, "BenchmarkCluster: scenario d's waves")
	cbWaveGap      = flag.Duration("cluster-wave-gap", 4*time.Second, "BenchmarkCluster: scenario d's time between waves")
	cbSyncInterval = flag.String("cluster-sync-interval", "3s", "BenchmarkCluster: upload.syncer.interval of the proxies")
	cbResults      = flag.String("cluster-results", "", "BenchmarkCluster: directory for JSON, Markdown and plots (default results/cluster-<time>)")
	cbResume       = flag.Bool("cluster-resume", false, "BenchmarkCluster: keep the JSON runs already in -cluster-results and run only the missing ones")
	cbLogLevel     = flag.String("cluster-log-level", "warn", "BenchmarkCluster: the proxies' log level")
	cbConfig       = flag.String("cluster-config", "", "BenchmarkCluster: TOML added to every proxy's configuration (say \"[pieces]\\nreaders = 1\"), to compare settings")
)

// clusterSpec is one run of one scenario in one mode.
type clusterSpec struct {
	Scenario    string
	Mode        string // state, fcfs, direct
	Repeat      int
	Nodes       int
	Size        int64   // the blob, scenarios a, b, d
	Layers      []int64 // the image's layer files, scenario c
	NodeBps     int64
	Origin      int64
	Slow        int    // b, e: slow parents
	SlowKind    string // b, e: throttle or load
	SlowOwner   bool   // e: the digest's owner is one of the slow
	Waves       int
	Gap         time.Duration
	Ctr         int    // c: nodes pulling with containerd
	Ctd         string // c: containerd 1.x or 2.x
	Puller      string // c: crictl or ctr
	Snapshotter string // c: containerd's snapshotter
}

// containerdFor is the containerd of a scenario c: 1.x or 2.x.
func containerdFor(tb testing.TB, v string) containerdVersion {
	for _, c := range containerds {
		if c.name == "containerd-"+v {
			return c
		}
	}
	tb.Fatalf("containerd %q: want 1.x or 2.x", v)
	return containerdVersion{}
}

// undoer runs cleanups newest first, on the way out or on an interrupt.
type undoer struct {
	mu  sync.Mutex
	fns []func()
}

func (u *undoer) add(f func()) { u.mu.Lock(); u.fns = append(u.fns, f); u.mu.Unlock() }

func (u *undoer) run() {
	u.mu.Lock()
	defer u.mu.Unlock()
	for i := len(u.fns) - 1; i >= 0; i-- {
		u.fns[i]()
	}
	u.fns = nil
}

// startIn starts a command in host h in its own process group, stopped by u.
func startIn(tb testing.TB, ctx context.Context, u *undoer, h *netlab.Host, stdout io.Writer, name string, args ...string) *exec.Cmd {
	tb.Helper()
	cmd := h.Command(ctx, name, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Stderr = os.Stderr
	if stdout != nil {
		cmd.Stdout = stdout
	}
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	u.add(func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		cmd.Wait()
	})
	return cmd
}

// newClusterLab makes the lab of a cluster run, closed by u, and its host 1,
// the origin, uploading at origin bytes/s.
func newClusterLab(tb testing.TB, ctx context.Context, u *undoer, origin int64) (*netlab.Lab, *netlab.Host) {
	tb.Helper()
	lab, err := netlab.New(ctx)
	if err != nil {
		tb.Fatal(err)
	}
	u.add(func() {
		if err := lab.Close(); err != nil {
			tb.Logf("netlab: %v", err)
		}
	})
	h, err := lab.AddHost(ctx, 1, netlab.Limits{Up: origin})
	if err != nil {
		tb.Fatal(err)
	}
	return lab, h
}

// registryInfo is what cmd/testregistry prints.
type registryInfo struct {
	Digest string
	Size   int64
	Stats  string
	Image  *struct {
		Config string
		Layers []struct {
			Digest string
			Size   int64
		}
	}
}

func startRegistryIn(tb testing.TB, ctx context.Context, u *undoer, h *netlab.Host, port int, args ...string) registryInfo {
	tb.Helper()
	r, w := io.Pipe()
	startIn(tb, ctx, u, h, w, *regBin, append([]string{"--listen", fmt.Sprintf("%s:%d", h.IP, port)}, args...)...)
	var info registryInfo
	if err := json.NewDecoder(bufio.NewReader(r)).Decode(&info); err != nil {
		tb.Fatalf("testregistry: %v", err)
	}
	go io.Copy(io.Discard, r)
	return info
}

// runCluster runs one scenario in one mode on real processes in network
// namespaces: the upstream registry in its own, one registry-proxy per node.
func runCluster(tb testing.TB, sp clusterSpec) report.Run {
	needRoot(tb)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	u := &undoer{}
	unregister := onInterrupt(u.run)
	defer func() { unregister(); u.run() }()

	// Everything on disk goes when the run ends, not when the benchmark
	// does: a benchmark of many runs would fill the disk with blobs.
	runDir, err := os.MkdirTemp("", "rp-cluster-")
	if err != nil {
		tb.Fatal(err)
	}
	u.add(func() {
		exec.Command("chmod", "-R", "u+w", runDir).Run() // snapshots may hold read-only dirs
		os.RemoveAll(runDir)
	})
	lab, regHost := newClusterLab(tb, ctx, u, sp.Origin)
	regArgs := []string{"--blob", fmt.Sprint(sp.Size)}
	if len(sp.Layers) > 0 {
		var files []string
		for _, l := range sp.Layers {
			files = append(files, fmt.Sprint(l))
		}
		regArgs = []string{"--blob", "1KiB", "--image", strings.Join(files, ",")}
	}
	info := startRegistryIn(tb, ctx, u, regHost, 5000, regArgs...)
	regURL := "http://" + regHost.IP + ":5000"

	// What the nodes pull: the blob, or the image's layers.
	blobs := []benchBlob{{info.Digest, sp.Size}}
	if info.Image != nil {
		blobs = nil
		for _, l := range info.Image.Layers {
			blobs = append(blobs, benchBlob{l.Digest, l.Size})
		}
	}
	var total, biggest int64
	for _, b := range blobs {
		total += b.size
		biggest = max(biggest, b.size)
	}

	ids := make([]string, sp.Nodes)
	for i := range ids {
		ids[i] = fmt.Sprintf("node-%02d", i+1)
	}
	// In scenario b slow parents are never the owner: that measures the
	// parent selection; scenario e makes the owner one of them, which
	// measures who seeds.
	slow := map[int]bool{}
	own := owner.Rank(blobs[0].digest, ids)[0]
	if sp.SlowOwner && sp.Slow > 0 {
		slow[slices.Index(ids, own)] = true
	}
	for i := 0; i < sp.Nodes && len(slow) < sp.Slow; i++ {
		if ids[i] != own {
			slow[i] = true
		}
	}
	ups := make([]float64, sp.Nodes)
	downs := make([]float64, sp.Nodes)
	var hosts []*netlab.Host
	for i := range sp.Nodes {
		lim := netlab.Limits{Up: sp.NodeBps, Down: sp.NodeBps}
		if slow[i] && sp.SlowKind == "throttle" {
			lim.Up = sp.NodeBps / 10
		}
		ups[i], downs[i] = float64(lim.Up), float64(lim.Down)
		h, err := lab.AddHost(ctx, i+2, lim)
		if err != nil {
			tb.Fatal(err)
		}
		hosts = append(hosts, h)
	}
	if sp.SlowKind == "load" && len(slow) > 0 {
		// Background uploads from each loaded node to a sink host: bounded
		// in count and time, and killed when the run ends.
		sink, err := lab.AddHost(ctx, sp.Nodes+2, netlab.Limits{})
		if err != nil {
			tb.Fatal(err)
		}
		for i := range slow {
			li := startRegistryIn(tb, ctx, u, hosts[i], 5100, "--blob", "64MiB", "--seed", "77")
			url := fmt.Sprintf("http://%s:5100/v2/bench/blob/blobs/%s", hosts[i].IP, li.Digest)
			loop := fmt.Sprintf(`i=0; end=$(($(date +%%s)+900)); while [ $i -lt 400 ] && [ $(date +%%s) -lt $end ]; do curl -s -o /dev/null %s; i=$((i+1)); done`, url)
			for range 4 {
				startIn(tb, ctx, u, sink, nil, "sh", "-c", loop)
			}
		}
	}

	mirrors := make([]string, len(hosts))
	admins := make([]string, len(hosts))
	// The proxies' and containerds' processes: their CPU time is reported.
	var proxyCmds, ctdCmds []*exec.Cmd
	if sp.Mode != "direct" {
		secret := writeSecret(tb)
		// Host state from the namespace's own interface, maxima as tc shapes it.
		for i, h := range hosts {
			cfg := filepath.Join(runDir, ids[i]+".toml")
			err := os.WriteFile(cfg, []byte(fmt.Sprintf("[upload]\ninterface = \"eth0\"\nmax_tx = \"%d\"\nmax_rx = \"%d\"\n[upload.syncer]\ninterval = \"%s\"\n%s\n", int64(ups[i]), int64(downs[i]), *cbSyncInterval, strings.ReplaceAll(*cbConfig, `\n`, "\n"))), 0o644)
			if err != nil {
				tb.Fatal(err)
			}
			join := hosts[(i+1)%len(hosts)].IP + ":7000"
			if i > 0 {
				join = hosts[0].IP + ":7000"
			}
			proxyCmds = append(proxyCmds, startIn(tb, ctx, u, h, nil, *proxyBin, "serve", "--config", cfg, "--listen", h.IP+":5000", "--peer-listen", h.IP+":7000", "--join", join,
				"--admin-listen", h.IP+":5001", "--cluster-secret", secret,
				"--node-id", ids[i], "--selector", sp.Mode, "--upstream", "bench.invalid="+regURL,
				"--data-dir", filepath.Join(runDir, ids[i]), "--log-level", *cbLogLevel))
			mirrors[i] = "http://" + h.IP + ":5000"
			admins[i] = "http://" + h.IP + ":5001"
		}
		if err := probe.WaitMembers(ctx, admins, sp.Nodes, 60*time.Second); err != nil {
			tb.Fatal(err)
		}
	}
	// Containerd daemons of scenario c, each in its node's namespace.
	ctrSock := map[int]string{}
	var ctd containerdVersion
	if sp.Ctr > 0 {
		ctd = containerdFor(tb, sp.Ctd)
	}
	for i := range min(sp.Ctr, sp.Nodes) {
		dir := filepath.Join(runDir, fmt.Sprintf("ctd-%d", i))
		server, mirror := "https://127.0.0.1:9", hosts[i].IP+":5000"
		if sp.Mode == "direct" {
			server, mirror = regURL, regHost.IP+":5000"
		}
		d := filepath.Join(dir, "certs.d", "bench.invalid")
		os.MkdirAll(d, 0o755)
		hostsToml := fmt.Sprintf("server = %q\n\n[host.\"http://%s\"]\n  capabilities = [\"pull\", \"resolve\"]\n", server, mirror)
		if err := os.WriteFile(filepath.Join(d, "hosts.toml"), []byte(hostsToml), 0o644); err != nil {
			tb.Fatal(err)
		}
		cfg := filepath.Join(dir, "config.toml")
		os.WriteFile(cfg, []byte(ctd.config(dir, sp.Snapshotter)), 0o644)
		ctdCmds = append(ctdCmds, startIn(tb, ctx, u, hosts[i], nil, ctd.daemon(tb), "--config", cfg, "--log-level", "warn"))
		ctrSock[i] = dir
		deadline := time.Now().Add(30 * time.Second)
		for exec.Command(ctd.ctr(tb), "--address", dir+"/c.sock", "version").Run() != nil {
			if time.Now().After(deadline) {
				tb.Fatal("containerd did not come up")
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	// Let host state (load included) reach every follower.
	time.Sleep(4 * time.Second)

	res := report.Run{Scenario: sp.Scenario, Mode: sp.Mode, Repeat: sp.Repeat, Nodes: sp.Nodes, Size: total,
		NodeBps: sp.NodeBps, OriginBps: sp.Origin, Seconds: map[string]float64{},
		BySource: map[string]int64{}, ByParent: map[string]int64{}, PieceSize: clusterPlanner(tb).For(biggest).PieceSize}
	per := (sp.Nodes + max(sp.Waves, 1) - 1) / max(sp.Waves, 1)
	var mu sync.Mutex
	var wg sync.WaitGroup
	busy0, total0 := cpuTimes()
	proxyCPU0, ctdCPU0 := sumCPU(tb, proxyCmds), sumCPU(tb, ctdCmds)
	t0 := time.Now()
	for i, h := range hosts {
		wg.Go(func() {
			if sp.Waves > 1 {
				time.Sleep(time.Until(t0.Add(time.Duration(i/per) * sp.Gap)))
			}
			start := time.Now()
			var err error
			if dir, ok := ctrSock[i]; ok && sp.Puller == "crictl" {
				// As kubelet pulls: CRI, the hosts files of the CRI plugin's
				// config_path.
				ep := "unix://" + dir + "/c.sock"
				var out []byte
				out, err = h.Command(ctx, tool(tb, "crictl"), "--runtime-endpoint", ep, "--image-endpoint", ep, "--timeout", "15m",
					"pull", "bench.invalid/bench/image:latest").CombinedOutput()
				if err != nil {
					err = fmt.Errorf("crictl pull: %w: %s", err, tail(string(out), 5))
				}
			} else if ok {
				var out []byte
				out, err = h.Command(ctx, ctd.ctr(tb), "--address", dir+"/c.sock", "--namespace", "bench", "images", "pull",
					"--hosts-dir", dir+"/certs.d", "--snapshotter", sp.Snapshotter, "bench.invalid/bench/image:latest").CombinedOutput()
				if err != nil {
					err = fmt.Errorf("ctr pull: %w: %s", err, tail(string(out), 5))
				}
			} else {
				err = pullBlobs(ctx, h, sp.Mode, regURL, mirrors[i], blobs)
			}
			secs := time.Since(start).Seconds()
			if err != nil {
				tb.Errorf("%s: %v", ids[i], err)
				return
			}
			mu.Lock()
			res.Seconds[ids[i]] = secs
			mu.Unlock()
		})
	}
	wg.Wait()
	if busy1, total1 := cpuTimes(); total1 > total0 {
		res.CPUBusy = float64(busy1-busy0) / float64(total1-total0)
	}
	res.ProxyCPU = sumCPU(tb, proxyCmds).sub(proxyCPU0).seconds()
	res.ContainerdCPU = sumCPU(tb, ctdCmds).sub(ctdCPU0).seconds()

	up := statsOf(tb, info)
	res.Egress = up.Bytes
	if !up.LastWrite.IsZero() {
		res.UpstreamDone = up.LastWrite.Sub(t0).Seconds()
	}
	if sp.Mode == "direct" {
		res.BySource["upstream"] = res.Egress
	} else {
		// When each proxy had each blob verified (its readers had their last
		// byte then). A blob without a record leaves the figure unknown.
		var done float64
		known := true
		for _, m := range admins {
			for _, b := range blobs {
				st, err := probe.Blob(ctx, m, b.digest)
				if err != nil {
					known = false
					continue
				}
				if st.Verified > 0 {
					done = max(done, st.Started.Add(st.Verified).Sub(t0).Seconds())
				} else {
					known = false
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
		}
		if known {
			res.ProxiesDone = done
		}
	}
	// The bound is for the nodes that start together: the first wave.
	first := min(per, sp.Nodes)
	res.Bound = report.KumarRoss(float64(total), float64(sp.Origin), ups[:first], downs[:first])
	res.Note = sp.note()
	res.Finish()
	return res
}

// clusterLinks is the blob size, each node's link and the origin's upload
// the -cluster flags set.
func clusterLinks(tb testing.TB) (size, up, origin int64) {
	tb.Helper()
	var errs []error
	size, err := units.RAMInBytes(*cbSize)
	errs = append(errs, err)
	up, err = units.FromHumanSize(*cbUp)
	errs = append(errs, err)
	origin, err = units.FromHumanSize(*cbOrigin)
	if err := errors.Join(append(errs, err)...); err != nil {
		tb.Fatal(err)
	}
	return size, up, origin
}

// clusterPlanner cuts blobs as the proxies do: with -cluster-config's
// pieces.min_size, if it sets one.
func clusterPlanner(tb testing.TB) piece.Planner {
	tb.Helper()
	p := filepath.Join(tb.TempDir(), "cluster-config.toml")
	if err := os.WriteFile(p, []byte(strings.ReplaceAll(*cbConfig, `\n`, "\n")), 0o644); err != nil {
		tb.Fatal(err)
	}
	cfg, err := config.Load(p)
	if err != nil {
		tb.Fatalf("-cluster-config: %v", err)
	}
	return piece.Planner{Min: int64(cfg.Pieces.MinSize)}
}

func (sp clusterSpec) note() string {
	var n []string
	if sp.Slow > 0 && sp.SlowKind == "throttle" {
		n = append(n, fmt.Sprintf("%d parents upload at 1/10 of the link", sp.Slow))
	}
	if sp.SlowOwner {
		n = append(n, "the digest's owner among them")
	}
	if sp.Slow > 0 && sp.SlowKind == "load" {
		n = append(n, fmt.Sprintf("%d parents' uploads loaded by 4 background transfers each", sp.Slow))
	}
	if len(sp.Layers) > 0 {
		n = append(n, fmt.Sprintf("image of %d layers, %d nodes pull with containerd %s (%s, %s), the others fetch each layer with curl", len(sp.Layers), min(sp.Ctr, sp.Nodes), sp.Ctd, sp.Puller, sp.Snapshotter))
	}
	if sp.Waves > 1 {
		n = append(n, fmt.Sprintf("%d waves %v apart, times from each node's own start, bound for the first wave", sp.Waves, sp.Gap))
	}
	return strings.Join(n, "; ")
}

// cpuTimes reads the machine's busy and total CPU time (jiffies) from
// /proc/stat; zeros where it cannot.
func cpuTimes() (busy, total uint64) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	for k, v := range f[1:] {
		var n uint64
		fmt.Sscan(v, &n)
		total += n
		if k != 3 && k != 4 { // idle, iowait
			busy += n
		}
	}
	return busy, total
}

type benchBlob struct {
	digest string
	size   int64
}

// pullBlobs fetches every blob at once and checks its digest.
func pullBlobs(ctx context.Context, h *netlab.Host, mode, regURL, mirror string, blobs []benchBlob) error {
	errs := make([]error, len(blobs))
	var wg sync.WaitGroup
	for k, b := range blobs {
		url := regURL + "/v2/bench/blob/blobs/" + b.digest
		if mode != "direct" {
			url = mirror + "/v2/bench/blob/blobs/" + b.digest + "?ns=bench.invalid"
		}
		wg.Go(func() {
			out, err := h.Command(ctx, "sh", "-c", "curl -sS --fail "+url+" | "+hashCmd).CombinedOutput()
			if err == nil && !strings.HasPrefix(string(out), strings.TrimPrefix(b.digest, "sha256:")) {
				err = fmt.Errorf("digest mismatch")
			}
			if err != nil {
				errs[k] = fmt.Errorf("%s: %w: %s", b.digest, err, out)
			}
		})
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// BenchmarkCluster runs the cluster scenarios on real processes in network
// namespaces with tc limits: `make bench-cluster`. Each scenario runs in
// every mode once per repeat, so ratios between modes come from runs made
// one after the other on the same machine.
func BenchmarkCluster(b *testing.B) {
	size, up, origin := clusterLinks(b)
	var layers []int64
	for _, l := range strings.Split(*cbImage, ",") {
		n, err := units.RAMInBytes(strings.TrimSpace(l))
		if err != nil {
			b.Fatal(err)
		}
		layers = append(layers, n)
	}
	if left, _ := netlab.Leftovers(context.Background()); len(left) > 0 {
		b.Logf("network namespaces or links of an earlier lab are still here: %v", left)
	}
	dir := *cbResults
	if dir == "" {
		dir = filepath.Join("..", "results", "cluster-"+time.Now().UTC().Format("20060102-150405"))
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		b.Fatal(err)
	}
	var all []report.Run
	have := map[string]bool{}
	if *cbResume {
		files, _ := filepath.Glob(filepath.Join(dir, "*.json"))
		for _, f := range files {
			var r report.Run
			if b, err := os.ReadFile(f); err == nil && json.Unmarshal(b, &r) == nil && r.Mode != "" {
				all = append(all, r)
				have[fmt.Sprint(r.Scenario, r.Mode, r.Repeat)] = true
			}
		}
		b.Logf("resuming with %d runs from %s", len(all), dir)
	}
	for range b.N {
		for rep := range *cbRuns {
			for _, sc := range strings.Split(*cbScenarios, ",") {
				for _, mode := range strings.Split(*cbModes, ",") {
					if have[fmt.Sprint(sc, mode, rep)] {
						continue
					}
					sp := clusterSpec{Scenario: sc, Mode: mode, Repeat: rep, Nodes: *cbNodes, Size: size, NodeBps: up, Origin: origin}
					switch sc {
					case "a":
					case "b":
						sp.Slow, sp.SlowKind = *cbSlow, *cbSlowKind
					case "e":
						sp.Slow, sp.SlowKind, sp.SlowOwner = *cbSlow, *cbSlowKind, true
					case "c":
						sp.Layers, sp.Ctr, sp.Ctd, sp.Puller, sp.Snapshotter = layers, *cbCtr, *cbContainerd, *cbPuller, *cbSnapshotter
					case "d":
						sp.Waves, sp.Gap = *cbWaves, *cbWaveGap
					default:
						b.Fatalf("unknown scenario %q (a, b, c, d, e)", sc)
					}
					r := runCluster(b, sp)
					all = append(all, r)
					if err := report.WriteJSON(dir, r); err != nil {
						b.Error(err)
					}
					b.Logf("scenario %s, %-6s run %d: p50 %.2fs p95 %.2fs max %.2fs | bound %.2fs, max/bound %.2f | upstream done %.2fs (%.2f x bound), proxies done %.2fs (%.2f x bound), egress %.3f x | bytes %v | CPU busy %.0f%%: proxies %.1f CPU-s (%.2f a GiB received), containerd %.1f CPU-s",
						sc, mode, rep+1, r.P50, r.P95, r.Max, r.Bound, r.MaxOver, r.UpstreamDone, r.UpstreamDone/r.Bound, r.ProxiesDone, r.ProxiesDone/r.Bound, r.EgressX, r.BySource, 100*r.CPUBusy,
						r.ProxyCPU, r.ProxyCPU/(float64(r.Size)*float64(r.Nodes)/(1<<30)), r.ContainerdCPU)
				}
			}
		}
	}
	md := report.Summary(all)
	if err := os.WriteFile(filepath.Join(dir, "summary.md"), []byte(md), 0o644); err != nil {
		b.Error(err)
	}
	files, err := report.Plots(dir, all)
	if err != nil {
		b.Error(err)
	}
	b.Logf("results in %s (%d plots)\n%s", dir, len(files), md)
	scs, modes, by := report.Group(all)
	for _, sc := range scs {
		for _, m := range modes[sc] {
			b.ReportMetric(report.Median(by[[2]string{sc, m}], func(r report.Run) float64 { return r.MaxOver }), sc+"-"+m+"-max/bound")
		}
	}
	b.ReportMetric(0, "ns/op")
}

// The small version of scenario (a) that CI runs: 3 nodes in namespaces, all
// pulling at once through their proxies; one copy leaves the upstream.
func TestClusterNamespacesSmall(t *testing.T) {
	const size = 16 << 20
	r := runCluster(t, clusterSpec{Scenario: "a", Mode: "state", Nodes: 3, Size: size, NodeBps: 25e6, Origin: 25e6})
	t.Logf("3 nodes, 16 MiB, 25 MB/s: p50 %.2fs max %.2fs, bound %.2fs, upstream egress %.3f x, bytes %v", r.P50, r.Max, r.Bound, r.EgressX, r.BySource)
	if r.EgressX > 1.05 {
		t.Errorf("upstream egress %.3f x the blob, want <= 1.05", r.EgressX)
	}
	if len(r.Seconds) != 3 {
		t.Errorf("%d nodes finished, want 3", len(r.Seconds))
	}
	if r.Max < r.Bound {
		t.Errorf("slowest node %.2fs beat the lower bound %.2fs: the timing is wrong", r.Max, r.Bound)
	}
}

// Scenario c, small: two namespaces pull a two-layer image with crictl
// through containerd 2.x's CRI and their proxies while a third fetches the
// layers with curl.
func TestClusterContainerdNamespaces(t *testing.T) {
	r := runCluster(t, clusterSpec{Scenario: "c", Mode: "state", Nodes: 3, Layers: []int64{8 << 20, 4 << 20}, NodeBps: 50e6, Origin: 50e6, Ctr: 2, Ctd: "2.x", Puller: "crictl", Snapshotter: "overlayfs"})
	t.Logf("3 nodes (2 containerd), 12 MiB image: max %.2fs, upstream egress %.3f x, bytes %v", r.Max, r.EgressX, r.BySource)
	if len(r.Seconds) != 3 {
		t.Errorf("%d nodes finished, want 3", len(r.Seconds))
	}
	if r.EgressX > 1.05 {
		t.Errorf("upstream egress %.3f x the image, want <= 1.05", r.EgressX)
	}
	if r.BySource["peer"] == 0 {
		t.Error("no layer bytes came from peers")
	}
}
