package integration

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/registry-proxy/registry-proxy/internal/netlab"
	"github.com/registry-proxy/registry-proxy/internal/probe"
	"github.com/registry-proxy/registry-proxy/internal/testregistry"
	"github.com/registry-proxy/registry-proxy/metrics"
)

// Private images pulled as kubelet pulls them, on real processes in network
// namespaces: the registry in a host of its own, four nodes each with its
// registry-proxy (the cluster) and its own containerd 2.x, whose hosts.toml
// puts the node's mirror before the registry. Every node's kubelet calls
// CRI PullImage with the pod's credentials and ServerAddress naming the
// registry, so containerd gives them to the registry only: the mirrors see
// anonymous requests.
//
//   - node-basic: access mode "node" and the nodes' own credentials from
//     [upstream.credentials] (basic auth): the mirrors serve the image, the
//     registry sends each layer about once in all, peers share the rest.
//   - client-fallback: no access rule (mode "client", the default) and no
//     node credentials: each mirror refuses at once, containerd falls back
//     to the registry with the pod's credentials; every pull succeeds, no
//     mirror serves a private byte, and falling back costs little.
//   - node-provider-token: mode "node" with the nodes' credentials from a
//     kubelet credential provider plugin (internal/credplugin), the
//     registry behind token auth: as node-basic, and the plugin ran.
//   - client-unscoped-auth: as client-fallback, but the AuthConfig has no
//     ServerAddress (what crictl --creds sends; kubelet's keyring, in the
//     versions read, builds its AuthConfigs from docker config entries
//     without one): containerd then gives the pod's credentials to the
//     mirror as well, which is judged by them and serves: as node-basic.
func TestKubeletPrivatePulls(t *testing.T) {
	for _, tc := range []kubeletCase{
		{name: "node-basic", mode: "node", nodeCreds: true},
		{name: "client-fallback"},
		{name: "node-provider-token", mode: "node", provider: true, token: true},
		{name: "client-unscoped-auth", unscoped: true},
	} {
		t.Run(tc.name, func(t *testing.T) { runKubeletCase(t, tc) })
	}
}

// kubeletCase is one case of TestKubeletPrivatePulls.
type kubeletCase struct {
	name      string
	mode      string // [access.registries."REG"] mode; "": no rule (client)
	nodeCreds bool   // the nodes' credentials in [upstream.credentials]
	provider  bool   // the nodes' credentials from the credential provider plugin
	token     bool   // the registry hands out bearer tokens for the credentials
	unscoped  bool   // the pod's AuthConfig without ServerAddress
}

const (
	kubeletNodes = 4
	// The image: two layers, 24 MiB in all.
	kubeletLayers = "16MiB,8MiB"
	kubeletUser   = "kube-puller"
	kubeletPass   = "pull-secret-5c1d9e"
	kubeletToken  = "bearer-for-kube-puller-77ab"
	// Each node's and the registry's links, bytes/s.
	kubeletBps       = 50e6
	kubeletProvider  = "rp-test-provider"
	kubeletImageRepo = "bench/image"
)

// kubeletLab is a running case: the registry's host and what it prints,
// and per node its mirror's admin URL and log, its containerd's directory,
// log and CRI client.
type kubeletLab struct {
	dir       string
	reg       registryInfo
	regName   string // host:port, as image references name the registry
	regURL    string
	hosts     []*netlab.Host
	admins    []string
	proxyLogs []*logBuffer
	ctdDirs   []string
	ctdLogs   []*logBuffer
	cri       []*criClient
	counts    []string // the plugin's count files, per node
	pluginBin string   // the plugin's bin dir, shared by the nodes
	unscoped  bool
}

func runKubeletCase(t *testing.T, tc kubeletCase) {
	needRoot(t)
	ctd := containerdFor(t, "2.x")
	daemon := ctd.daemon(t)
	l := &kubeletLab{unscoped: tc.unscoped}
	// Logs go to the test log last, once every process has stopped.
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		for i := range l.proxyLogs {
			t.Logf("--- node %d registry-proxy log:\n%s", i, tail(l.proxyLogs[i].String(), 6000))
		}
		for i := range l.ctdLogs {
			t.Logf("--- node %d containerd log:\n%s", i, tail(l.ctdLogs[i].String(), 3000))
		}
	})
	// The processes get SIGTERM from u before the context's end kills them.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	t.Cleanup(cancel)
	u := &undoer{}
	unregister := onInterrupt(u.run)
	t.Cleanup(func() { unregister(); u.run() })

	var err error
	if l.dir, err = os.MkdirTemp("", "rp-kub-"); err != nil {
		t.Fatal(err)
	}
	u.add(func() {
		exec.Command("chmod", "-R", "u+w", l.dir).Run()
		os.RemoveAll(l.dir)
	})
	lab, regHost := newClusterLab(t, ctx, u, kubeletBps)
	regArgs := []string{"--blob", "1KiB", "--image", kubeletLayers, "--seed", "41", "--basic-auth", kubeletUser + ":" + kubeletPass}
	if tc.token {
		regArgs = append(regArgs, "--token", kubeletToken)
	}
	l.reg = startRegistryIn(t, ctx, u, regHost, 5000, regArgs...)
	if l.reg.Image == nil {
		t.Fatal("testregistry pushed no image")
	}
	l.regName = regHost.IP + ":5000"
	l.regURL = "http://" + l.regName
	ref := l.regName + "/" + kubeletImageRepo + ":latest"

	// The nodes' own credentials, as an operator gives them.
	var extra strings.Builder
	if tc.nodeCreds {
		pw := filepath.Join(l.dir, "registry-password")
		if err := os.WriteFile(pw, []byte(kubeletPass+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&extra, "[upstream.credentials.%q]\nusername = %q\npassword_file = %q\n\n", l.regName, kubeletUser, pw)
	}
	if tc.mode != "" {
		fmt.Fprintf(&extra, "[access.registries.%q]\nmode = %q\n\n", l.regName, tc.mode)
	}
	secret := writeSecret(t)
	for i := range kubeletNodes {
		h, err := lab.AddHost(ctx, i+2, netlab.Limits{Up: kubeletBps, Down: kubeletBps})
		if err != nil {
			t.Fatal(err)
		}
		l.hosts = append(l.hosts, h)
	}
	for i, h := range l.hosts {
		id := fmt.Sprintf("node-%02d", i+1)
		nodeCfg := extra.String()
		if tc.provider {
			nodeCfg += l.providerConfig(t, i)
		}
		cfg := filepath.Join(l.dir, id+".toml")
		body := fmt.Sprintf("[upload]\ninterface = \"eth0\"\nmax_tx = \"%d\"\nmax_rx = \"%d\"\n\n[upstream.registries]\n%q = %q\n\n%s",
			int64(kubeletBps), int64(kubeletBps), l.regName, l.regURL, nodeCfg)
		if err := os.WriteFile(cfg, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		join := l.hosts[0].IP + ":7000"
		if i == 0 {
			join = l.hosts[1].IP + ":7000"
		}
		out := &logBuffer{}
		l.proxyLogs = append(l.proxyLogs, out)
		startLoggedIn(t, ctx, u, h, out, *proxyBin, "serve", "--config", cfg, "--listen", h.IP+":5000", "--peer-listen", h.IP+":7000",
			"--join", join, "--admin-listen", h.IP+":5001", "--cluster-secret", secret, "--node-id", id,
			"--data-dir", filepath.Join(l.dir, id), "--log-level", "debug", "--log-format", "json", "--containerd-address", "none")
		l.admins = append(l.admins, "http://"+h.IP+":5001")
	}
	// containerd on every node, its mirror first, the registry itself last.
	for i, h := range l.hosts {
		dir := filepath.Join(l.dir, fmt.Sprintf("c%d", i))
		writeKubeletHosts(t, dir, l.regName, h.IP+":5000")
		cfg := filepath.Join(dir, "config.toml")
		if err := os.WriteFile(cfg, []byte(ctd.config(dir, "native")), 0o644); err != nil {
			t.Fatal(err)
		}
		out := &logBuffer{}
		l.ctdLogs = append(l.ctdLogs, out)
		exited := startLoggedIn(t, ctx, u, h, out, daemon, "--config", cfg, "--log-level", "info")
		l.ctdDirs = append(l.ctdDirs, dir)
		// Dialled once its socket is there: gRPC backs off between attempts.
		deadline := time.Now().Add(30 * time.Second)
		for {
			if _, err := os.Stat(dir + "/c.sock"); err == nil {
				break
			}
			select {
			case <-exited:
				t.Fatalf("node %d: containerd exited:\n%s", i, tail(out.String(), 3000))
			case <-time.After(50 * time.Millisecond):
			}
			if time.Now().After(deadline) {
				t.Fatalf("node %d: containerd made no socket in 30s", i)
			}
		}
		l.cri = append(l.cri, dialCRI(t, dir+"/c.sock"))
	}
	if err := probe.WaitMembers(ctx, l.admins, kubeletNodes, 60*time.Second); err != nil {
		t.Fatal(err)
	}
	for i, c := range l.cri {
		if err := c.waitReady(ctx, 30*time.Second); err != nil {
			t.Fatalf("node %d: %v", i, err)
		}
	}

	var layerBytes int64
	for _, ly := range l.reg.Image.Layers {
		layerBytes += ly.Size
	}
	before := kubeletRegistryStats(t, l.reg)
	took := l.pullAll(t, ctx, ref)
	after := kubeletRegistryStats(t, l.reg)
	sent := after.BlobBytes - before.BlobBytes
	vals := l.scrapeAll(t, ctx)
	peer := sumOver(vals, "registry_proxy_blob_bytes_total", `source="peer"`)
	up := sumOver(vals, "registry_proxy_blob_bytes_total", `source="upstream"`)
	t.Logf("%s: %d nodes pulled %s (%d layers, %.1f MiB): %s; registry sent %.1f MiB (%.2f x the layers) in %d blob GETs; mirrors took %.1f MiB from the registry, %.1f MiB from peers",
		tc.name, kubeletNodes, ref, len(l.reg.Image.Layers), mib(layerBytes), fmtDurations(took), mib(sent), float64(sent)/float64(layerBytes),
		after.BlobGets-before.BlobGets, mib(int64(up)), mib(int64(peer)))

	// The credentials, in any form, appear in no mirror's log.
	secrets := []string{kubeletPass, kubeletToken, base64.StdEncoding.EncodeToString([]byte(kubeletUser + ":" + kubeletPass))}
	for i, out := range l.proxyLogs {
		for _, s := range secrets {
			if strings.Contains(out.String(), s) {
				t.Errorf("node %d's mirror logged a credential (%.6s...)", i, s)
			}
		}
	}

	switch {
	case tc.unscoped:
		// Whether the registry sent a layer once or more depends on which
		// node asked first: with the client's own credentials each node
		// fetches private content itself (TestPrivateContent).
		l.checkServed(t)
	case tc.mode == "node":
		l.checkServed(t)
		l.checkOnce(t, before, after, peer)
		if tc.provider {
			runs := sumOver(vals, "registry_proxy_credential_provider_runs_total", `result="ok"`)
			var lines int
			for _, f := range l.counts {
				lines += countLines(f)
			}
			t.Logf("credential provider: %v successful runs in the metrics, %d runs in the plugin's count files", runs, lines)
			if runs == 0 {
				t.Error(`registry_proxy_credential_provider_runs_total{result="ok"} is 0 on every node`)
			}
			if lines == 0 {
				t.Error("the credential provider plugin never ran")
			}
		}
	default:
		l.checkFallback(t, ctx, ref, vals, before, after, took)
	}
}

// providerConfig writes node i's CredentialProviderConfig and builds the
// plugin into its bin dir; it returns the TOML that points the node at them.
func (l *kubeletLab) providerConfig(t *testing.T, i int) string {
	t.Helper()
	if l.pluginBin == "" {
		l.pluginBin = filepath.Join(l.dir, "plugins")
		buildCredPlugin(t, l.pluginBin, kubeletProvider)
	}
	dir := filepath.Join(l.dir, fmt.Sprintf("provider-%d", i))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	pw := filepath.Join(dir, "password")
	if err := os.WriteFile(pw, []byte(kubeletPass+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	count := filepath.Join(dir, "runs")
	l.counts = append(l.counts, count)
	cfg := filepath.Join(dir, "providers.yaml")
	writeProviderConfig(t, cfg, kubeletProvider, []string{l.regName}, "1m",
		"--username", kubeletUser, "--password-file", pw, "--count-file", count)
	return fmt.Sprintf("[upstream.credential_providers]\nconfig = %q\nbin_dir = %q\ntimeout = \"10s\"\n\n", cfg, l.pluginBin)
}

// pullAll pulls ref on every node at once through CRI with the pod's
// credentials, and checks each got the image.
func (l *kubeletLab) pullAll(t *testing.T, ctx context.Context, ref string) []time.Duration {
	t.Helper()
	took := make([]time.Duration, len(l.cri))
	var wg sync.WaitGroup
	for i, c := range l.cri {
		wg.Go(func() {
			pctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
			defer cancel()
			start := time.Now()
			auth := kubeletAuth(kubeletUser, kubeletPass, l.regName)
			if l.unscoped {
				auth.ServerAddress = ""
			}
			id, err := c.pull(pctx, ref, auth)
			took[i] = time.Since(start)
			if err != nil {
				t.Errorf("node %d: PullImage %s: %v", i, ref, err)
				return
			}
			if id != l.reg.Image.Config {
				t.Errorf("node %d: PullImage %s gave image %s, want %s", i, ref, id, l.reg.Image.Config)
			}
			if img, err := c.status(pctx, ref); err != nil || img == nil {
				t.Errorf("node %d: ImageStatus %s after the pull: %v, %v", i, ref, img, err)
			}
		})
	}
	wg.Wait()
	return took
}

// checkOnce: the registry sent each layer about once in all, and peers
// shared the rest.
func (l *kubeletLab) checkOnce(t *testing.T, before, after kubeletStats, peer float64) {
	var layerBytes, sent int64
	for _, ly := range l.reg.Image.Layers {
		n := after.PerBlob[ly.Digest] - before.PerBlob[ly.Digest]
		layerBytes += ly.Size
		sent += n
		if float64(n) > 1.25*float64(ly.Size) {
			t.Errorf("the registry sent layer %s %.2f times (%d of %d bytes): the mirrors did not serve it", short(ly.Digest), float64(n)/float64(ly.Size), n, ly.Size)
		}
	}
	if x := float64(sent) / float64(layerBytes); x > 1.25 {
		t.Errorf("the registry sent %.2f x the image's layers, want <= 1.25", x)
	}
	if peer == 0 {
		t.Error(`no layer bytes came from peers: registry_proxy_blob_bytes_total{source="peer"} is 0 on every node`)
	}
}

// checkServed: every node's mirror served its containerd every layer, and
// no containerd went past its mirror.
func (l *kubeletLab) checkServed(t *testing.T) {
	for i, out := range l.ctdLogs {
		if strings.Contains(out.String(), "trying next host") {
			t.Errorf("node %d: containerd went past its mirror to the registry", i)
		}
	}
	for i, out := range l.proxyLogs {
		reqs := requestLines(out.String())
		for _, ly := range l.reg.Image.Layers {
			var served int64
			for _, r := range reqs {
				if r.Method == http.MethodGet && r.Status/100 == 2 && strings.HasSuffix(r.Path, "/blobs/"+ly.Digest) {
					served += r.Bytes
				}
			}
			if served < ly.Size {
				t.Errorf("node %d's mirror served %d of layer %s's %d bytes to its containerd", i, served, short(ly.Digest), ly.Size)
			}
		}
	}
}

// checkFallback: every mirror refused at once, served no private byte and
// fetched none; each containerd took the image from the registry, and the
// pull took little longer than a pull straight from the registry.
func (l *kubeletLab) checkFallback(t *testing.T, ctx context.Context, ref string, vals []metrics.Values, before, after kubeletStats, took []time.Duration) {
	for _, ly := range l.reg.Image.Layers {
		if n := after.PerBlob[ly.Digest] - before.PerBlob[ly.Digest]; n < kubeletNodes*ly.Size {
			t.Errorf("the registry sent layer %s %.2f times, want %d (every containerd from the registry itself)", short(ly.Digest), float64(n)/float64(ly.Size), kubeletNodes)
		}
	}
	if got := sumOver(vals, "registry_proxy_blob_bytes_total", `source="upstream"`) + sumOver(vals, "registry_proxy_blob_bytes_total", `source="peer"`); got != 0 {
		t.Errorf("the mirrors fetched %v private blob bytes, want 0", got)
	}
	refusals := sumOver(vals, "registry_proxy_private_refusals_total", `mode="client"`, `reason="no_credentials"`)
	if refusals == 0 {
		t.Error(`registry_proxy_private_refusals_total{mode="client",reason="no_credentials"} is 0 on every node`)
	}
	var slowest time.Duration
	var refused []int
	for i, out := range l.proxyLogs {
		n := 0
		for _, r := range requestLines(out.String()) {
			if !strings.HasPrefix(r.Path, "/v2/"+kubeletImageRepo+"/") {
				continue
			}
			if r.Status/100 == 2 && r.Bytes > 0 {
				t.Errorf("node %d's mirror served %d private bytes: %s %s %d", i, r.Bytes, r.Method, r.Path, r.Status)
			}
			if r.Status == http.StatusUnauthorized {
				n++
				slowest = max(slowest, r.duration())
			}
		}
		refused = append(refused, n)
		if n == 0 {
			t.Errorf("node %d's mirror answered no request for the image with 401", i)
		}
	}
	// Per node, from containerd's log: the pull's start to its giving up on
	// the mirror (its first "trying next host").
	var fallbacks []time.Duration
	for i, out := range l.ctdLogs {
		log := out.String()
		t0, ok0 := ctdLogTime(log, `msg="PullImage \"`+ref+`\""`)
		t1, ok1 := ctdLogTime(log, "trying next host")
		if !ok0 || !ok1 {
			t.Errorf("node %d: containerd's log does not show the pull starting (%v) and falling back (%v)", i, ok0, ok1)
			continue
		}
		fallbacks = append(fallbacks, t1.Sub(t0))
		if t1.Sub(t0) > time.Second {
			t.Errorf("node %d: containerd fell back to the registry %v after the pull started, want < 1s", i, t1.Sub(t0))
		}
	}
	t.Logf("mirrors' 401s per node %v, the slowest %v; containerd fell back after %s; private refusals counted %v",
		refused, slowest, fmtDurations(fallbacks), refusals)
	if slowest > time.Second {
		t.Errorf("a mirror took %v to refuse an anonymous request for private content, want < 1s", slowest)
	}

	// The same pull straight from the registry, for comparison: the image
	// removed (its content with it), the mirror out of hosts.toml.
	for i, c := range l.cri {
		if err := c.remove(ctx, ref); err != nil {
			t.Fatalf("node %d: RemoveImage: %v", i, err)
		}
		writeKubeletHosts(t, l.ctdDirs[i], l.regName, "")
	}
	b := kubeletRegistryStats(t, l.reg)
	direct := l.pullAll(t, ctx, ref)
	a := kubeletRegistryStats(t, l.reg)
	var layerBytes int64
	for _, ly := range l.reg.Image.Layers {
		layerBytes += ly.Size
	}
	t.Logf("client mode (mirror first, then the registry): %s; straight from the registry: %s (registry sent %.2f x the layers)",
		fmtDurations(took), fmtDurations(direct), float64(a.BlobBytes-b.BlobBytes)/float64(layerBytes))
	if a.BlobBytes-b.BlobBytes < kubeletNodes*layerBytes {
		t.Errorf("the direct pulls took %d bytes from the registry, want %d: the image was not removed", a.BlobBytes-b.BlobBytes, kubeletNodes*layerBytes)
	}
	if slices.Max(took) > slices.Max(direct)+3*time.Second {
		t.Errorf("falling back cost %v: the slowest pull took %v with the mirror first, %v straight from the registry", slices.Max(took)-slices.Max(direct), slices.Max(took), slices.Max(direct))
	}
}

// ctdLogTime is the time of containerd's first log line holding s.
func ctdLogTime(log, s string) (time.Time, bool) {
	for _, line := range strings.Split(log, "\n") {
		if !strings.Contains(line, s) {
			continue
		}
		v, ok := strings.CutPrefix(line, `time="`)
		if v, _, ok2 := strings.Cut(v, `"`); ok && ok2 {
			if ts, err := time.Parse(time.RFC3339Nano, v); err == nil {
				return ts, true
			}
		}
	}
	return time.Time{}, false
}

// writeKubeletHosts writes containerd's hosts.toml for registry: the
// registry itself as server (plain HTTP), the node's mirror (if any) first.
func writeKubeletHosts(t testing.TB, ctdDir, registry, mirror string) {
	t.Helper()
	d := filepath.Join(ctdDir, "certs.d", registry)
	if err := os.MkdirAll(d, 0o755); err != nil {
		t.Fatal(err)
	}
	hosts := fmt.Sprintf("server = \"http://%s\"\n", registry)
	if mirror != "" {
		hosts += fmt.Sprintf("\n[host.\"http://%s\"]\n  capabilities = [\"pull\", \"resolve\"]\n", mirror)
	}
	if err := os.WriteFile(filepath.Join(d, "hosts.toml"), []byte(hosts), 0o644); err != nil {
		t.Fatal(err)
	}
}

// startLoggedIn starts a command in host h, its output (both streams) in
// out, stopped by u; the channel is closed when it exits.
func startLoggedIn(t testing.TB, ctx context.Context, u *undoer, h *netlab.Host, out *logBuffer, name string, args ...string) <-chan struct{} {
	t.Helper()
	cmd := h.Command(ctx, name, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	u.add(func() {
		// SIGTERM first: containerd unmounts and the proxy flushes.
		syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-done
		}
	})
	return done
}

// kubeletStats is what cmd/testregistry has sent since it started.
type kubeletStats struct {
	BlobBytes int64            `json:"blob_bytes"`
	BlobGets  int64            `json:"blob_gets"`
	PerBlob   map[string]int64 `json:"per_blob"`
}

func kubeletRegistryStats(t testing.TB, info registryInfo) kubeletStats {
	t.Helper()
	resp, err := http.Get(info.Stats + "/_stats")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var st kubeletStats
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		t.Fatal(err)
	}
	if st.PerBlob == nil {
		t.Fatal("testregistry's /_stats has no per_blob: an older build?")
	}
	return st
}

func (l *kubeletLab) scrapeAll(t testing.TB, ctx context.Context) []metrics.Values {
	t.Helper()
	var out []metrics.Values
	for _, a := range l.admins {
		v, err := metrics.Scrape(ctx, a+"/metrics")
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, v)
	}
	return out
}

func sumOver(vals []metrics.Values, name string, match ...string) float64 {
	var s float64
	for _, v := range vals {
		s += v.Sum(name, match...)
	}
	return s
}

// requestLog is one "request" line of a proxy's JSON log.
type requestLog struct {
	Time     time.Time       `json:"time"`
	Msg      string          `json:"msg"`
	Method   string          `json:"method"`
	Path     string          `json:"path"`
	Status   int             `json:"status"`
	Bytes    int64           `json:"bytes"`
	Duration json.RawMessage `json:"duration"`
}

// duration is the line's duration: slog writes nanoseconds, or a string
// such as "1.2ms" from a TextMarshaler.
func (r requestLog) duration() time.Duration {
	if n, err := strconv.ParseInt(string(r.Duration), 10, 64); err == nil {
		return time.Duration(n)
	}
	var s string
	if json.Unmarshal(r.Duration, &s) == nil {
		if d, err := time.ParseDuration(s); err == nil {
			return d
		}
	}
	return -1
}

func requestLines(log string) []requestLog {
	var out []requestLog
	for _, line := range strings.Split(log, "\n") {
		if !strings.Contains(line, `"msg":"request"`) {
			continue
		}
		var r requestLog
		if json.Unmarshal([]byte(line), &r) == nil && r.Msg == "request" {
			out = append(out, r)
		}
	}
	return out
}

func mib(n int64) float64 { return float64(n) / (1 << 20) }

func short(d string) string {
	if len(d) > 19 {
		return d[:19]
	}
	return d
}

func fmtDurations(ds []time.Duration) string {
	var s []string
	for _, d := range ds {
		s = append(s, d.Round(10*time.Millisecond).String())
	}
	return strings.Join(s, " ")
}

// buildCredPlugin builds internal/credplugin as bin/name.
func buildCredPlugin(t testing.TB, bin, name string) string {
	t.Helper()
	if _, err := os.Stat("../internal/credplugin"); err != nil {
		t.Fatalf("the test credential provider plugin: %v", err)
	}
	if err := os.MkdirAll(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(bin, name)
	mustRun(t, 3*time.Minute, "go", "build", "-o", p, "../internal/credplugin")
	return p
}

// writeProviderConfig writes a kubelet CredentialProviderConfig (YAML) with
// one provider: the plugin name, for images of the registries given.
func writeProviderConfig(t testing.TB, path, name string, registries []string, cache string, args ...string) {
	t.Helper()
	var b strings.Builder
	fmt.Fprintf(&b, "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n  - name: %s\n    apiVersion: credentialprovider.kubelet.k8s.io/v1\n    defaultCacheDuration: %q\n    matchImages:\n", name, cache)
	for _, r := range registries {
		fmt.Fprintf(&b, "      - %q\n", r)
	}
	b.WriteString("    args:\n")
	for _, a := range args {
		fmt.Fprintf(&b, "      - %q\n", a)
	}
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
}

func countLines(path string) int {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	return strings.Count(string(b), "\n")
}

// procsWith lists the processes whose command line holds s.
func procsWith(s string) []int {
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && strings.Contains(string(b), s) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// The credential provider plugin as the nodes' credentials, on one proxy
// on loopback with the real binary and registries, and plain HTTP requests
// from a client without credentials (as kubelet's pulls reach a mirror):
//
//   - refresh: the registry's password rotates while the plugin's answer is
//     cached for an hour; the mirror, refused, runs the plugin again and
//     serves.
//   - failing: a plugin that exits 1: private content is refused at once
//     (401), a public registry the plugin also matches is still served, and
//     the failure is logged and counted.
//   - hanging: a plugin that never answers, with timeout = "1s": the request
//     ends within a few seconds, the timeout is logged and counted, and the
//     plugin's process is gone.
func TestKubeletCredentialProvider(t *testing.T) {
	t.Run("refresh", func(t *testing.T) {
		const oldPass, newPass = "rotating-pw-one-4e1b", "rotating-pw-two-9d07"
		f := newProviderFixture(t)
		f.priv.SetCredentials("alice", oldPass)
		pw := filepath.Join(f.dir, "password")
		if err := os.WriteFile(pw, []byte(oldPass+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		px := f.start(t, "10s", "--username", "alice", "--password-file", pw, "--cache-duration", "1h", "--cache-key-type", "Registry")

		code, _, got := f.get(t, px, f.priv, "team/one", f.blobs[0])
		if code != http.StatusOK || got != f.blobs[0] {
			t.Fatalf("anonymous pull of a private blob with the plugin's credentials: %d, %s", code, short(got))
		}
		runs := countLines(f.count)
		// The registry's password changes, and the plugin's file with it; the
		// mirror still holds the old answer (cached for an hour).
		f.priv.SetCredentials("alice", newPass)
		if err := os.WriteFile(pw, []byte(newPass+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		code, _, got = f.get(t, px, f.priv, "team/two", f.blobs[1])
		t.Logf("plugin runs: %d before the rotation, %d after; the pull after it took %v", runs, countLines(f.count), time.Since(start).Round(time.Millisecond))
		if code != http.StatusOK || got != f.blobs[1] {
			t.Errorf("pull after the password rotated: %d, %s; want 200 with the blob", code, short(got))
		}
		if after := countLines(f.count); after <= runs {
			t.Errorf("the plugin ran %d times before the rotation and %d after: the mirror did not ask it again", runs, after)
		}
		v := scrape(t, px)
		t.Logf(`credential_provider_runs_total{result="ok"} %v`, v.Sum("registry_proxy_credential_provider_runs_total", `result="ok"`))
		if v.Sum("registry_proxy_credential_provider_runs_total", `result="ok"`) < 2 {
			t.Error(`registry_proxy_credential_provider_runs_total{result="ok"} < 2`)
		}
		for _, s := range []string{oldPass, newPass} {
			if strings.Contains(px.output(), s) {
				t.Errorf("the proxy's log holds the plugin's answer (%s)", s)
			}
		}
	})

	t.Run("failing", func(t *testing.T) {
		f := newProviderFixture(t)
		f.priv.SetCredentials("alice", "never-given-out")
		px := f.start(t, "10s", "--fail")

		start := time.Now()
		code, challenge, _ := f.get(t, px, f.priv, "team/one", f.blobs[0])
		tookPriv := time.Since(start)
		start = time.Now()
		pcode, _, got := f.get(t, px, f.pub, "library/public", f.pubBlob)
		tookPub := time.Since(start)
		v := scrape(t, px)
		failed := v.Sum("registry_proxy_credential_provider_runs_total", `result="failed"`)
		t.Logf("private: %d in %v (challenge %q); public: %d in %v; runs %d; failed runs counted %v",
			code, tookPriv.Round(time.Millisecond), challenge, pcode, tookPub.Round(time.Millisecond), countLines(f.count), failed)
		if code != http.StatusUnauthorized || challenge == "" {
			t.Errorf("private blob with a failing plugin: %d, challenge %q; want 401 with the registry's challenge", code, challenge)
		}
		if tookPriv > 2*time.Second {
			t.Errorf("the refusal took %v, want < 2s", tookPriv)
		}
		if pcode != http.StatusOK || got != f.pubBlob {
			t.Errorf("public blob with a failing plugin: %d, %s; want 200 with the blob", pcode, short(got))
		}
		if countLines(f.count) == 0 {
			t.Error("the plugin never ran")
		}
		if failed == 0 {
			t.Error(`registry_proxy_credential_provider_runs_total{result="failed"} is 0`)
		}
		if !logSays(px.output(), kubeletProvider, "fail", "exit") {
			t.Errorf("no log line names provider %s and its failure", kubeletProvider)
		}
	})

	t.Run("hanging", func(t *testing.T) {
		f := newProviderFixture(t)
		f.priv.SetCredentials("alice", "never-given-out")
		pidFile := filepath.Join(f.dir, "pid")
		px := f.start(t, "1s", "--hang", "--pid-file", pidFile)
		t.Cleanup(func() {
			// Should the proxy leave one behind: ours, found by its own path.
			for _, pid := range procsWith(f.count) {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		})

		start := time.Now()
		code, _, _ := f.get(t, px, f.priv, "team/one", f.blobs[0])
		took := time.Since(start)
		v := scrape(t, px)
		timeouts := v.Sum("registry_proxy_credential_provider_runs_total", `result="timeout"`)
		t.Logf("private blob with a hanging plugin: %d in %v; runs %d; timeouts counted %v", code, took.Round(time.Millisecond), countLines(f.count), timeouts)
		if code == http.StatusOK {
			t.Errorf("private blob served with a plugin that never answered")
		}
		if took > 5*time.Second {
			t.Errorf("the request took %v with timeout = 1s, want < 5s", took)
		}
		if countLines(f.count) == 0 {
			t.Fatal("the plugin never ran")
		}
		if timeouts == 0 {
			t.Error(`registry_proxy_credential_provider_runs_total{result="timeout"} is 0`)
		}
		if !logSays(px.output(), kubeletProvider, "timeout", "timed out", "deadline") {
			t.Errorf("no log line names provider %s and its timeout", kubeletProvider)
		}
		// The plugin's process ends with its run.
		pid, _ := strconv.Atoi(strings.TrimSpace(readFile(pidFile)))
		deadline := time.Now().Add(5 * time.Second)
		for {
			left := procsWith(f.count)
			if len(left) == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("the hanging plugin is still running (pids %v; its own %d) %v after the request ended", left, pid, time.Since(start)-took)
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		if pid > 0 {
			if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err == nil {
				if b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); strings.Contains(string(b), f.count) {
					t.Errorf("plugin process %d still exists", pid)
				}
			}
		}
	})
}

// providerFixture: a private registry with two blobs (team/one, team/two),
// a public one (library/public), and the plugin built.
type providerFixture struct {
	dir       string
	priv, pub *testregistry.Registry
	blobs     []string
	pubBlob   string
	bin       string
	count     string
}

func newProviderFixture(t *testing.T) *providerFixture {
	t.Helper()
	f := &providerFixture{dir: t.TempDir()}
	f.priv, f.pub = startRegistry(t), startRegistry(t)
	ctx := context.Background()
	for i, repo := range []string{"team/one", "team/two"} {
		d, err := f.priv.PushBlob(ctx, repo, testregistry.RandomBytes(1<<20, uint64(60+i)))
		if err != nil {
			t.Fatal(err)
		}
		f.blobs = append(f.blobs, d)
	}
	var err error
	if f.pubBlob, err = f.pub.PushBlob(ctx, "library/public", testregistry.RandomBytes(1<<20, 70)); err != nil {
		t.Fatal(err)
	}
	f.bin = filepath.Join(f.dir, "bin")
	buildCredPlugin(t, f.bin, kubeletProvider)
	f.count = filepath.Join(f.dir, "runs")
	return f
}

// start runs a proxy whose node credentials come from the plugin with args
// (and the count file), for both registries, both in access mode "node".
func (f *providerFixture) start(t *testing.T, timeout string, args ...string) *proxy {
	t.Helper()
	cfg := filepath.Join(f.dir, "providers.yaml")
	writeProviderConfig(t, cfg, kubeletProvider, []string{f.priv.Host, f.pub.Host}, "1m", append(args, "--count-file", f.count)...)
	toml := filepath.Join(f.dir, "proxy.toml")
	body := fmt.Sprintf("[upstream.credential_providers]\nconfig = %q\nbin_dir = %q\ntimeout = %q\n\n[access.registries.%q]\nmode = \"node\"\n\n[access.registries.%q]\nmode = \"node\"\n",
		cfg, f.bin, timeout, f.priv.Host, f.pub.Host)
	if err := os.WriteFile(toml, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return startProxy(t, "", "--config", toml, "--upstream", f.priv.Host+"="+f.priv.URL, "--upstream", f.pub.Host+"="+f.pub.URL)
}

// get fetches blob d of repo from reg through px without credentials.
func (f *providerFixture) get(t *testing.T, px *proxy, reg *testregistry.Registry, repo, d string) (int, string, string) {
	t.Helper()
	return pull(t, http.MethodGet, "http://"+px.Addr+"/v2/"+repo+"/blobs/"+d+"?ns="+reg.Host, "")
}

// logSays reports whether a warning or error line of log names who and
// holds one of words (any case).
func logSays(log, who string, words ...string) bool {
	for _, line := range strings.Split(log, "\n") {
		if !strings.Contains(line, who) || !strings.Contains(line, `"level":"WARN"`) && !strings.Contains(line, `"level":"ERROR"`) {
			continue
		}
		low := strings.ToLower(line)
		for _, w := range words {
			if strings.Contains(low, w) {
				return true
			}
		}
	}
	return false
}

func readFile(p string) string {
	b, _ := os.ReadFile(p)
	return string(b)
}
