package integration

import (
	"context"
	"flag"
	"fmt"
	"math"
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

	"github.com/registry-proxy/registry-proxy/internal/ports"
	"github.com/registry-proxy/registry-proxy/internal/report"
	"github.com/registry-proxy/registry-proxy/internal/testregistry"
	"github.com/registry-proxy/registry-proxy/metrics"
)

var (
	fmCases      = flag.String("fm-cases", "all", "BenchmarkFailureModes: the cases to run, comma-separated (see fmCaseList), or all")
	fmRuns       = flag.Int("fm-runs", 3, "BenchmarkFailureModes: repetitions of each case (the machine may be shared: median and worst)")
	fmCap        = flag.Duration("fm-cap", 150*time.Second, "BenchmarkFailureModes: a pull still running after this long is cut off and counted as hung")
	fmContainerd = flag.String("fm-containerd", "2.x", "BenchmarkFailureModes: the containerd that pulls, 1.x or 2.x")
	fmDebug      = flag.Bool("fm-debug", false, "BenchmarkFailureModes: log containerd's lines about hosts, retries and errors of each fault pull")
	fmLayers     = flag.String("fm-layers", "64KiB,8MiB,192MiB", "BenchmarkFailureModes: the image's layers (the last one is where mid-layer faults strike)")
)

// Paces of the failure modes, bytes/s per connection, as the registry's
// object storage paces each connection. midPace slows a layer enough that a
// fault can strike in the middle of it; the mirror reads a blob over several
// connections, a direct pull over one.
const (
	midPace          = 16e6
	slowMirrorPace   = 1e6
	slowUpstreamPace = 8e6
)

// fmEnv is what every failure-mode pull shares: the registry containerd
// falls back to (hosts.toml's server) and the mirror's upstream, two
// registries holding the same image so that their counters tell who asked
// for what.
type fmEnv struct {
	direct, upstream *testregistry.Registry
	img              *testregistry.Image
	v                containerdVersion
	ref              string
	crictl           string
}

// fmTraffic is what one registry served during a pull.
type fmTraffic struct {
	manifests int64 // HEADs and GETs of manifests (tags and digests)
	blobBytes int64
}

// fmPull is one timed `ctr images pull`.
type fmPull struct {
	secs               float64
	err                error // the pull failed (or was cut off)
	firstErr           error // with retry: the first attempt's failure
	hung               bool  // still running at fmCap
	direct, viaUpstrm  fmTraffic
	stale              float64 // the mirror's stale answers (registry_proxy_stale_answers_total)
	containerdFallback bool    // containerd's log says it tried the next host
	ctdLog             string  // containerd's log lines about hosts and errors
}

// fmRun is one fault pull's mirror, for the fault to act on.
type fmRun struct {
	env     *fmEnv
	listen  string
	dataDir string
	config  string
	mu      sync.Mutex
	px      *proxy
}

func (r *fmRun) mirror() *proxy {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.px
}

func (r *fmRun) startMirror(b *testing.B) *proxy {
	args := []string{"--listen", r.listen, "--upstream", mirroredRegistry + "=" + r.env.upstream.URL, "--log-level", "info"}
	if r.config != "" {
		args = append(args, "--config", r.config)
	}
	px := startProxy(b, r.dataDir, args...)
	r.mu.Lock()
	r.px = px
	r.mu.Unlock()
	return px
}

// signal sends sig to the mirror's process.
func (r *fmRun) signal(sig syscall.Signal) {
	if px := r.mirror(); px != nil {
		syscall.Kill(px.cmd.Process.Pid, sig)
	}
}

// fmCase is one failure mode. The direct pull runs under the fault's
// registry conditions (paceDirect, and outage when set); the healthy pull
// through a mirror with no fault, its upstream paced healthyPace.
type fmCase struct {
	name, what  string
	paceDirect  int64
	paceUpstrm  int64 // the mirror's upstream during the fault pull
	healthyPace int64
	warm        bool   // the mirror pulled the image once before the measured pull
	outage      string // both registries, during the fault and direct pulls
	config      string // the mirror's config.toml, when not the defaults
	noDirect    bool   // the direct pull is another case's
	retry       bool   // a failed fault pull is tried again at once
	// cri pulls every pull of the case with crictl through containerd's
	// CRI (kubelet's path) instead of ctr, with the CRI plugin's
	// image_pull_progress_timeout set to this (containerd 2.x only).
	cri string
	// before acts on the mirror before the pull starts; during runs
	// alongside it until it returns (ctx ends with the pull); undo puts
	// things back for teardown.
	before func(b *testing.B, r *fmRun)
	during func(ctx context.Context, b *testing.B, r *fmRun)
	undo   func(r *fmRun)
}

// midLayer waits until the mirror's upstream has sent a quarter of the
// image's last (largest) layer, then runs f. false: the pull ended first.
func midLayer(ctx context.Context, r *fmRun, f func()) bool {
	big := r.env.img.Layers[len(r.env.img.Layers)-1]
	for r.env.upstream.BytesOf(big.Digest) < big.Size/4 {
		select {
		case <-ctx.Done():
			return false
		case <-time.After(10 * time.Millisecond):
		}
	}
	f()
	return true
}

func fmCaseList() []fmCase {
	cont := func(r *fmRun) { r.signal(syscall.SIGCONT) }
	return []fmCase{
		{
			name: "refused", what: "mirror process gone (connection refused)",
			before: func(b *testing.B, r *fmRun) {
				px := r.mirror()
				px.cmd.Process.Kill()
				<-px.done
			},
		},
		{
			name: "hung", what: "mirror hung before the pull (SIGSTOP: accepts, never answers)",
			before: func(b *testing.B, r *fmRun) { r.signal(syscall.SIGSTOP) },
			undo:   cont,
		},
		{
			name: "hung-mid-layer", what: "mirror hung mid-layer (SIGSTOP at 1/4 of the largest layer)",
			paceDirect: midPace, paceUpstrm: midPace, healthyPace: midPace,
			during: func(ctx context.Context, b *testing.B, r *fmRun) {
				midLayer(ctx, r, func() { r.signal(syscall.SIGSTOP) })
			},
			undo: cont,
		},
		{
			name: "hung-mid-layer-killed", what: "mirror hung mid-layer, killed 90 s later (the chart's liveness probe: 6 × 10 s, then the 30 s grace period), pull retried once",
			paceDirect: midPace, paceUpstrm: midPace, healthyPace: midPace, retry: true,
			during: func(ctx context.Context, b *testing.B, r *fmRun) {
				midLayer(ctx, r, func() {
					r.signal(syscall.SIGSTOP)
					select {
					case <-ctx.Done():
					case <-time.After(90 * time.Second):
						r.signal(syscall.SIGKILL)
					}
				})
			},
			undo: cont,
		},
		{
			name: "hung-mid-layer-cri", what: "mirror hung mid-layer, pulled through CRI (crictl, kubelet's path) with image_pull_progress_timeout = 30s, pull retried once",
			paceDirect: midPace, paceUpstrm: midPace, healthyPace: midPace, retry: true, cri: "30s",
			during: func(ctx context.Context, b *testing.B, r *fmRun) {
				midLayer(ctx, r, func() { r.signal(syscall.SIGSTOP) })
			},
			undo: cont,
		},
		{
			name: "mirror-slow", what: "mirror slow (its upstream paced to 1 MB/s a connection; the registry direct is not)",
			paceUpstrm: slowMirrorPace,
		},
		{
			name: "upstream-slow", what: "registry slow (8 MB/s a connection, for the mirror and direct alike)",
			paceDirect: slowUpstreamPace, paceUpstrm: slowUpstreamPace,
		},
		{
			name: "killed-mid-layer", what: "mirror killed (SIGKILL) at 1/4 of the largest layer, not restarted; pull retried once",
			paceDirect: midPace, paceUpstrm: midPace, healthyPace: midPace, retry: true,
			during: func(ctx context.Context, b *testing.B, r *fmRun) {
				midLayer(ctx, r, func() { r.signal(syscall.SIGKILL) })
			},
		},
		{
			name: "restarted-mid-layer", what: "mirror restarted (SIGTERM, then started again) at 1/4 of the largest layer",
			paceDirect: midPace, paceUpstrm: midPace, healthyPace: midPace,
			during: func(ctx context.Context, b *testing.B, r *fmRun) {
				midLayer(ctx, r, func() {
					px := r.mirror()
					r.signal(syscall.SIGTERM)
					select {
					case <-px.done:
					case <-time.After(time.Minute):
						b.Errorf("the mirror did not exit within a minute of SIGTERM")
						return
					}
					r.startMirror(b)
				})
			},
		},
		{
			name: "registry-down", what: "registry down (connection refused), mirror up and warm",
			warm: true, outage: testregistry.OutageRefuse,
		},
		{
			name: "registry-hung", what: "registry hung (accepts, never answers), mirror up and warm",
			warm: true, outage: testregistry.OutageHang,
		},
		{
			name: "registry-hung-rht5s", what: "registry hung, mirror warm with upstream.response_header_timeout = 5s",
			warm: true, outage: testregistry.OutageHang,
			config:   "[upstream]\nresponse_header_timeout = \"5s\"\n",
			noDirect: true,
		},
	}
}

// writeFMHosts points c at the registry (server) and, unless mirror is
// empty, at the mirror first. With no mirror the registry is a host entry
// as well: containerd 1.6 ignores a hosts.toml that has a server alone.
func writeFMHosts(b *testing.B, c *containerdEnv, server, mirror string) {
	hosts := fmt.Sprintf("server = %q\n", server)
	first := "http://" + mirror
	if mirror == "" {
		first = server
	}
	hosts += fmt.Sprintf("\n[host.%q]\n  capabilities = [\"pull\", \"resolve\"]\n", first)
	d := filepath.Join(c.hosts, mirroredRegistry)
	if err := os.MkdirAll(d, 0o755); err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(d, "hosts.toml"), []byte(hosts), 0o644); err != nil {
		b.Fatal(err)
	}
}

// discard stops a containerd and removes its root: every pull gets a fresh
// one, with no content, ingest or connection left from the last.
func (c *containerdEnv) discard() {
	c.proc.stop()
	exec.Command("chmod", "-R", "u+w", c.dir).Run()
	os.RemoveAll(c.dir)
}

// pull runs `ctr images pull` through a fresh containerd, each attempt cut
// off at fmCap; with retry, a failed attempt is followed at once by a second
// on the same containerd (as kubelet pulls again after a failure, but
// without its back-off), and secs is both.
func (e *fmEnv) pull(b *testing.B, fc fmCase, mirror string, retry bool, during func(ctx context.Context)) fmPull {
	var edit func(string) string
	if fc.cri != "" {
		edit = func(cfg string) string {
			const images = "[plugins.\"io.containerd.cri.v1.images\"]\n"
			if !strings.Contains(cfg, images) {
				b.Fatalf("%s: no %q in %s's config", fc.name, images, e.v.name)
			}
			return strings.Replace(cfg, images, images+fmt.Sprintf("  image_pull_progress_timeout = %q\n", fc.cri), 1)
		}
	}
	c := startContainerdWith(b, e.v, "127.0.0.1:9", edit)
	defer c.discard()
	writeFMHosts(b, c, e.direct.URL, mirror)
	e.direct.ResetCounters()
	e.upstream.ResetCounters()
	var wg sync.WaitGroup
	pullCtx, pullDone := context.WithCancel(context.Background())
	if during != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			during(pullCtx)
		}()
	}
	var ctrLog []string
	attempt := func() (hung bool, err error) {
		ctx, cancel := context.WithTimeout(context.Background(), *fmCap)
		defer cancel()
		debug := "--debug=false"
		if *fmDebug {
			// containerd 1.x's ctr resolves and fetches itself: its
			// own log says which host it tried.
			debug = "--debug"
		}
		cmd := exec.CommandContext(ctx, c.ctr, debug, "--address", c.sock, "--namespace", "rptest",
			"images", "pull", "--hosts-dir", c.hosts, "--snapshotter", "native", e.ref)
		if fc.cri != "" {
			// The hosts directory is containerd's config_path.
			ep := "unix://" + c.sock
			cmd = exec.CommandContext(ctx, e.crictl, "--runtime-endpoint", ep, "--image-endpoint", ep, "--timeout", "10s", "pull", e.ref)
		}
		cmd.WaitDelay = 5 * time.Second
		out, err := cmd.CombinedOutput()
		if *fmDebug {
			for _, l := range strings.Split(string(out), "\n") {
				if strings.Contains(l, "next host") || strings.Contains(l, "failed to do request") || strings.Contains(l, "level=error") {
					ctrLog = append(ctrLog, "ctr: "+tail(l, 400))
				}
			}
		}
		if ctx.Err() != nil {
			return true, fmt.Errorf("still running after %v", *fmCap)
		}
		if err != nil {
			return false, fmt.Errorf("%w: %s", err, tail(strings.TrimSpace(string(out)), 300))
		}
		return false, nil
	}
	start := time.Now()
	var p fmPull
	p.hung, p.err = attempt()
	if retry && p.err != nil && !p.hung {
		p.firstErr = p.err
		p.hung, p.err = attempt()
	}
	p.secs = time.Since(start).Seconds()
	pullDone()
	wg.Wait()
	p.direct = fmTraffic{e.direct.ManifestHeads() + e.direct.ManifestGets(), e.direct.BlobBytes()}
	p.viaUpstrm = fmTraffic{e.upstream.ManifestHeads() + e.upstream.ManifestGets(), e.upstream.BlobBytes()}
	p.containerdFallback = strings.Contains(c.proc.output(), "trying next host")
	if *fmDebug {
		var lines []string
		for _, l := range strings.Split(c.proc.output(), "\n") {
			if strings.Contains(l, "next host") || strings.Contains(l, "level=error") || strings.Contains(l, "failed to do request") || strings.Contains(l, "retry") {
				lines = append(lines, l)
			}
		}
		p.ctdLog = strings.Join(append(lines, ctrLog...), "\n")
	}
	return p
}

// measure runs the case's three pulls: healthy mirror, fault, direct.
func (e *fmEnv) measure(b *testing.B, fc fmCase) (healthy, fault, direct fmPull) {
	listen, err := ports.FreePair("127.0.0.1")
	if err != nil {
		b.Fatal(err)
	}
	setPace := func(direct, upstream int64) {
		e.direct.SetPace(direct)
		e.upstream.SetPace(upstream)
	}
	defer setPace(0, 0)

	// Healthy: a mirror with no fault, cold (warm for the cases that
	// need one), the registry up.
	newRun := func() *fmRun {
		r := &fmRun{env: e, listen: listen, dataDir: b.TempDir()}
		if fc.config != "" {
			r.config = writeTOML(b, fc.config)
		}
		r.startMirror(b)
		return r
	}
	teardown := func(r *fmRun) {
		if fc.undo != nil {
			fc.undo(r)
		}
		r.mirror().stopProxy()
		os.RemoveAll(r.dataDir)
	}
	warmUp := func(r *fmRun) {
		if !fc.warm {
			return
		}
		if w := e.pull(b, fc, r.listen, false, nil); w.err != nil {
			b.Fatalf("%s: warming the mirror: %v", fc.name, w.err)
		}
	}

	setPace(fc.healthyPace, fc.healthyPace)
	r := newRun()
	warmUp(r)
	healthy = e.pull(b, fc, r.listen, false, nil)
	teardown(r)
	if healthy.err != nil {
		b.Fatalf("%s: the healthy pull failed: %v\n%s", fc.name, healthy.err, tail(r.mirror().output(), 4000))
	}

	// The fault.
	setPace(fc.paceDirect, fc.paceUpstrm)
	r = newRun()
	warmUp(r)
	if fc.outage != "" {
		e.setOutage(b, fc.outage)
	}
	if fc.before != nil {
		fc.before(b, r)
	}
	var during func(ctx context.Context)
	if fc.during != nil {
		during = func(ctx context.Context) { fc.during(ctx, b, r) }
	}
	fault = e.pull(b, fc, r.listen, fc.retry, during)
	if fc.undo != nil {
		fc.undo(r)
	}
	if m, err := scrapeMaybe(r.mirror()); err == nil {
		fault.stale = m
	}
	if *fmDebug {
		var lines []string
		for _, l := range strings.Split(r.mirror().output(), "\n") {
			if strings.Contains(l, `"level":"WARN"`) || strings.Contains(l, `"level":"ERROR"`) || strings.Contains(l, "stale") {
				lines = append(lines, tail(l, 400))
			}
		}
		b.Logf("%s: the mirror's warnings:\n%s", fc.name, strings.Join(lines, "\n"))
	}
	e.setOutage(b, testregistry.OutageNone)
	teardown(r)

	// Direct: no mirror in hosts.toml, the fault's registry conditions.
	if fc.noDirect {
		return healthy, fault, fmPull{secs: math.NaN()}
	}
	if fc.outage != "" {
		e.setOutage(b, fc.outage)
	}
	setPace(fc.paceDirect, fc.paceDirect)
	direct = e.pull(b, fc, "", false, nil)
	e.setOutage(b, testregistry.OutageNone)
	return healthy, fault, direct
}

func (e *fmEnv) setOutage(b *testing.B, mode string) {
	for _, reg := range []*testregistry.Registry{e.direct, e.upstream} {
		if err := reg.SetOutage(mode); err != nil {
			b.Fatal(err)
		}
	}
}

// scrapeMaybe reads the mirror's stale answers, if it still runs.
func scrapeMaybe(px *proxy) (float64, error) {
	select {
	case <-px.done:
		return 0, fmt.Errorf("exited")
	default:
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	v, err := metrics.Scrape(ctx, "http://"+px.Admin+"/metrics")
	if err != nil {
		return 0, err
	}
	return v.Sum("registry_proxy_stale_answers_total"), nil
}

// BenchmarkFailureModes: `make bench-failure-modes` (root). For each way
// the mirror or the registry can fail, a `ctr images pull` through
// containerd (its own root, state and socket per pull; hosts.toml with the
// mirror first and the registry as server) against the same pull through a
// healthy mirror and straight from the registry: seconds of each (median
// and worst of fm-runs), what the fault adds, whether the pull succeeded,
// and which registry resolved the tag and sent the blobs. Loopback only;
// each pull is cut off at fm-cap.
func BenchmarkFailureModes(b *testing.B) {
	needRoot(b)
	var v containerdVersion
	for _, c := range containerds {
		if c.name == "containerd-"+*fmContainerd {
			v = c
		}
	}
	if v.name == "" {
		b.Fatalf("-fm-containerd %q: want 1.x or 2.x", *fmContainerd)
	}
	var files []int64
	for _, f := range strings.Split(*fmLayers, ",") {
		n, err := units.RAMInBytes(strings.TrimSpace(f))
		if err != nil {
			b.Fatalf("-fm-layers: %v", err)
		}
		files = append(files, n)
	}
	e := &fmEnv{v: v, ref: mirroredRegistry + "/" + imageRepo + ":" + imageTag}
	for _, reg := range []**testregistry.Registry{&e.direct, &e.upstream} {
		r, err := testregistry.Start(testregistry.Options{})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { r.Close() })
		img, err := r.PushImage(context.Background(), imageRepo, imageTag, files, 11)
		if err != nil {
			b.Fatal(err)
		}
		if e.img != nil && img.Digest != e.img.Digest {
			b.Fatalf("the two registries hold different images: %s, %s", e.img.Digest, img.Digest)
		}
		*reg, e.img = r, img
	}
	cases := fmCaseList()
	if *fmCases != "all" {
		want := strings.Split(*fmCases, ",")
		cases = slices.DeleteFunc(cases, func(c fmCase) bool { return !slices.Contains(want, c.name) })
		if len(cases) != len(want) {
			b.Fatalf("-fm-cases %q: unknown case among them", *fmCases)
		}
	}
	var rows []string
	for _, fc := range cases {
		b.Run(fc.name, func(b *testing.B) {
			if fc.cri != "" {
				if v.name != "containerd-2.x" {
					b.Skipf("%s: image_pull_progress_timeout is set in containerd 2.x's config only", fc.name)
				}
				e.crictl = tool(b, "crictl")
			}
			var healthy, fault, direct []float64
			var last fmPull
			failed, hung, directFailed, firstFailed := 0, 0, 0, 0
			var notes []string
			for run := range *fmRuns {
				h, f, d := e.measure(b, fc)
				healthy, fault, direct = append(healthy, h.secs), append(fault, f.secs), append(direct, d.secs)
				if f.err != nil {
					failed++
					notes = append(notes, fmt.Sprintf("run %d: %v", run+1, f.err))
				}
				if f.hung {
					hung++
				}
				if d.err != nil {
					directFailed++
				}
				if f.firstErr != nil {
					firstFailed++
					notes = append(notes, fmt.Sprintf("run %d: first attempt: %v", run+1, f.firstErr))
				}
				last = f
				b.Logf("run %d: healthy %.1fs | fault %.1fs (err %v; tag/manifest requests: registry %d, mirror's upstream %d; blob MiB: registry %.0f, mirror's upstream %.0f; stale answers %.0f; containerd tried next host %v) | direct %.1fs (err %v)",
					run+1, h.secs, f.secs, f.err, f.direct.manifests, f.viaUpstrm.manifests,
					float64(f.direct.blobBytes)/(1<<20), float64(f.viaUpstrm.blobBytes)/(1<<20), f.stale, f.containerdFallback, d.secs, d.err)
				if f.ctdLog != "" {
					b.Logf("run %d: containerd:\n%s", run+1, f.ctdLog)
				}
			}
			med, worst := report.MedianOf(fault), slices.Max(fault)
			hMed, dMed := report.MedianOf(healthy), report.MedianOf(direct)
			b.ReportMetric(med, "fault-median-s")
			b.ReportMetric(worst, "fault-worst-s")
			b.ReportMetric(hMed, "healthy-median-s")
			if !math.IsNaN(dMed) {
				b.ReportMetric(dMed, "direct-median-s")
				b.ReportMetric(med-dMed, "extra-vs-direct-s")
			}
			b.ReportMetric(med-hMed, "extra-vs-healthy-s")
			b.ReportMetric(worst-hMed, "worst-extra-vs-healthy-s")
			b.ReportMetric(float64(failed), "fault-failed")
			b.ReportMetric(0, "ns/op")
			result := "ok"
			switch {
			case hung > 0:
				result = fmt.Sprintf("%d/%d hung (cut at %v)", hung, *fmRuns, *fmCap)
			case failed > 0:
				result = fmt.Sprintf("%d/%d failed", failed, *fmRuns)
			}
			if firstFailed > 0 {
				result = fmt.Sprintf("first attempt failed %d/%d, then %s", firstFailed, *fmRuns, result)
			}
			dres := fmt.Sprintf("%.1f", dMed)
			if math.IsNaN(dMed) {
				dres = "as above"
			} else if directFailed > 0 {
				dres = fmt.Sprintf("%.1f (%d/%d failed)", dMed, directFailed, *fmRuns)
			}
			vsDirect := "—"
			if !math.IsNaN(dMed) {
				vsDirect = fmt.Sprintf("%+.1f", med-dMed)
			}
			rows = append(rows, fmt.Sprintf("| %s | %.1f / %.1f | %s | %.1f | %s | %+.1f / %+.1f | %s | manifest reqs: registry %d, via mirror %d; blob MiB: registry %.0f, via mirror %.0f |",
				fc.what, med, worst, result, hMed, dres, med-hMed, worst-hMed, vsDirect,
				last.direct.manifests, last.viaUpstrm.manifests, float64(last.direct.blobBytes)/(1<<20), float64(last.viaUpstrm.blobBytes)/(1<<20)))
			for _, n := range notes {
				b.Log(n)
			}
		})
	}
	b.Logf("%s, image %s (%s), %d runs each, pulls cut at %v\n| case | fault pull s (median / worst) | result | healthy mirror s | direct s | extra vs healthy s (median / worst) | extra vs direct s | last fault run: who served |\n|---|---|---|---|---|---|---|---|\n%s",
		v.name, *fmLayers, units.BytesSize(float64(e.img.LayerBytes())), *fmRuns, *fmCap, strings.Join(rows, "\n"))
}
