// Package demo shows registry-proxy at work on one machine: an embedded
// upstream registry paced like object storage, a registry-proxy node, and an
// image pulled through it the way containerd pulls, cold and then warm, with
// where every layer's bytes came from.
package demo

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"github.com/docker/go-units"
	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/config"
	"github.com/registry-proxy/registry-proxy/inspect"
	"github.com/registry-proxy/registry-proxy/internal/fetch"
	"github.com/registry-proxy/registry-proxy/internal/ports"
	"github.com/registry-proxy/registry-proxy/internal/probe"
	"github.com/registry-proxy/registry-proxy/internal/testregistry"
	"github.com/registry-proxy/registry-proxy/metrics"
	"github.com/registry-proxy/registry-proxy/node"
	"github.com/registry-proxy/registry-proxy/p2p/trust"
)

// Options configure a demo run.
type Options struct {
	Layers  []int64 // layer file sizes
	Nodes   int     // proxies in the cluster
	PaceBps int64   // upstream bytes/s per connection, 0 for none
	Out     io.Writer
	Logger  *slog.Logger
}

const registryName = "registry.demo.invalid"

// Run runs the demo.
func Run(ctx context.Context, o Options) error {
	out := o.Out
	if o.Nodes < 1 {
		o.Nodes = 1
	}
	var peerAddrs []string
	reg, err := testregistry.Start(testregistry.Options{})
	if err != nil {
		return err
	}
	defer reg.Close()
	fmt.Fprintf(out, "upstream registry  %s (in memory, paced to %s/s per connection)\n", reg.URL, units.HumanSize(float64(o.PaceBps)))
	img, err := reg.PushImage(ctx, "demo/app", "v1", o.Layers, 42)
	if err != nil {
		return err
	}
	var total int64
	for _, l := range img.Layers {
		total += l.Size
	}
	fmt.Fprintf(out, "image              %s/demo/app:v1  %s  %d layers, %s\n", registryName, img.Digest[:19], len(img.Layers), units.HumanSize(float64(total)))
	reg.SetPace(o.PaceBps)

	// The cluster's secret, as an operator would mount it.
	secretDir, err := os.MkdirTemp("", "registry-proxy-demo-secret-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(secretDir)
	secretFile := filepath.Join(secretDir, "cluster-secret")
	if err := os.WriteFile(secretFile, []byte(trust.NewSecret()+"\n"), 0o600); err != nil {
		return err
	}
	var mirrors []string
	admin := map[string]string{} // mirror -> its admin listener
	for i := 0; i < o.Nodes; i++ {
		dir, err := os.MkdirTemp("", "registry-proxy-demo-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(dir)
		cfg := config.Default()
		cfg.Listen = "127.0.0.1:0"
		cfg.Admin.Listen = "127.0.0.1:0"
		cfg.DataDir = dir
		cfg.Upstream.Registries = map[string]string{registryName: reg.URL}
		if o.Nodes > 1 {
			peerAddr, err := ports.FreePair("127.0.0.1")
			if err != nil {
				return err
			}
			cfg.P2P.PeerListen = peerAddr
			cfg.P2P.SecretFile = secretFile
			cfg.P2P.NodeID = fmt.Sprintf("node-%d", i+1)
			if i > 0 {
				cfg.P2P.Join = []string{peerAddrs[0]}
			}
			peerAddrs = append(peerAddrs, peerAddr)
		}
		n, err := node.Start(ctx, cfg, o.Logger)
		if err != nil {
			return err
		}
		defer n.Shutdown(context.Background())
		mirrors = append(mirrors, "http://"+n.Addr())
		admin["http://"+n.Addr()] = "http://" + n.AdminAddr()
		fmt.Fprintf(out, "registry-proxy     node-%d  mirror http://%s  peer %s\n", i+1, n.Addr(), n.PeerAddr())
	}
	admins := make([]string, len(mirrors))
	for i, m := range mirrors {
		admins[i] = admin[m]
	}
	if err := probe.WaitMembers(ctx, admins, len(mirrors), 20*time.Second); err != nil {
		return err
	}
	fmt.Fprintln(out)
	before := make([]metrics.Values, len(admins))
	for i, a := range admins {
		if before[i], err = metrics.Scrape(ctx, a+"/metrics"); err != nil {
			return err
		}
	}

	type round struct{ name, base, ns string }
	rounds := []round{{"direct from upstream (no mirror)", reg.URL, ""}}
	ns := "?ns=" + registryName
	rounds = append(rounds, round{"node-1, cold", mirrors[0], ns})
	for i := 1; i < len(mirrors); i++ {
		rounds = append(rounds, round{fmt.Sprintf("node-%d, cold (layers already in the cluster)", i+1), mirrors[i], ns})
	}
	rounds = append(rounds, round{"node-1, warm", mirrors[0], ns})
	for _, round := range rounds {
		reg.ResetCounters()
		fmt.Fprintf(out, "== %s\n", round.name)
		res, took, err := pull(ctx, out, round.base, round.ns, img, total)
		if err != nil {
			return fmt.Errorf("%s: %w", round.name, err)
		}
		fmt.Fprintf(out, "   %s in %v (%.0f MB/s), upstream sent %s of blobs\n",
			units.HumanSize(float64(total)), took.Round(time.Millisecond), float64(total)/took.Seconds()/1e6, units.HumanSize(float64(reg.BlobBytes())))
		tw := tabwriter.NewWriter(out, 2, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "layer\tsize\ttime\tMB/s\tfirst byte\tserved from\tbytes by source")
		for _, r := range res {
			src, bySource := "upstream", "-"
			if round.ns != "" {
				src = r.source
				bySource = "local disk"
				if src != "cache" {
					bySource = sources(ctx, admin[round.base], r.digest)
				}
			}
			fmt.Fprintf(tw, "%s\t%s\t%v\t%.0f\t%v\t%s\t%s\n", r.digest.Encoded()[:12], units.HumanSize(float64(r.size)),
				r.took.Round(time.Millisecond), float64(r.size)/r.took.Seconds()/1e6, r.ttfb.Round(time.Millisecond), src, bySource)
		}
		tw.Flush()
		fmt.Fprintln(out)
	}
	fmt.Fprintln(out, "served from: fetch = downloaded in pieces now and streamed while arriving; cache = complete, verified blob on disk.")
	fmt.Fprintln(out, "bytes by source: upstream = the registry; node-N = pieces from that peer. Each digest has one owner node that alone goes upstream.")
	fmt.Fprintln(out)
	return movedMetrics(ctx, out, admins, before)
}

// movedMetrics prints the registry_proxy_ metrics that changed on any node
// since before, as each node's /metrics shows them (docs/metrics.md).
func movedMetrics(ctx context.Context, out io.Writer, admins []string, before []metrics.Values) error {
	rows := map[string][]float64{}
	for i, a := range admins {
		after, err := metrics.Scrape(ctx, a+"/metrics")
		if err != nil {
			return err
		}
		for _, c := range metrics.Moved(before[i], after) {
			if rows[c.Series] == nil {
				rows[c.Series] = make([]float64, len(admins))
			}
			rows[c.Series][i] = c.After - c.Before
		}
	}
	series := slices.Sorted(maps.Keys(rows))
	fmt.Fprintln(out, "== metrics that moved during the pulls (change per node, from each admin listener's /metrics)")
	tw := tabwriter.NewWriter(out, 2, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprint(tw, "series\t")
	for i := range admins {
		fmt.Fprintf(tw, "node-%d\t", i+1)
	}
	fmt.Fprintln(tw)
	for _, s := range series {
		if strings.Contains(s, "_duration_seconds_sum") {
			continue // the _count says how many; the sum alone tells little
		}
		fmt.Fprintf(tw, "%s\t", strings.TrimPrefix(s, "registry_proxy_"))
		for _, v := range rows[s] {
			switch {
			case v == 0:
				fmt.Fprint(tw, "\t")
			case strings.Contains(s, "bytes"):
				fmt.Fprintf(tw, "%s\t", units.HumanSize(v))
			case strings.Contains(s, "weight"):
				fmt.Fprintf(tw, "%s/s\t", units.HumanSize(v))
			default:
				fmt.Fprintf(tw, "%g\t", v)
			}
		}
		fmt.Fprintln(tw)
	}
	return tw.Flush()
}

// progressBar redraws one line with the bytes done of total until stop is
// closed, then ends the line.
func progressBar(out io.Writer, done *atomic.Int64, total int64, stop <-chan struct{}, finished chan<- struct{}) {
	defer close(finished)
	start := time.Now()
	t := time.NewTicker(150 * time.Millisecond)
	defer t.Stop()
	draw := func() {
		n := done.Load()
		pct := 100 * float64(n) / float64(max(total, 1))
		w := int(pct / 100 * 40)
		fmt.Fprintf(out, "\r   [%s%s] %5.1f%%  %s of %s  %.0f MB/s ", strings.Repeat("#", min(w, 40)), strings.Repeat(".", max(40-w, 0)), pct,
			units.HumanSize(float64(n)), units.HumanSize(float64(total)), float64(n)/max(time.Since(start).Seconds(), 1e-3)/1e6)
	}
	// Redrawn only on a terminal; a log gets the last state.
	live := inspect.IsTerminal(out)
	for {
		select {
		case <-stop:
			draw()
			fmt.Fprintln(out)
			return
		case <-t.C:
			if live {
				draw()
			}
		}
	}
}

type layerResult struct {
	digest     digest.Digest
	size       int64
	took, ttfb time.Duration
	source     string
}

// pull fetches the image as containerd does: resolve the tag with HEAD, the
// manifest by digest, then config and layers, three at a time, each checked
// against its digest.
func pull(ctx context.Context, out io.Writer, base, ns string, img *testregistry.Image, total int64) ([]layerResult, time.Duration, error) {
	start := time.Now()
	var done atomic.Int64
	stop, finished := make(chan struct{}), make(chan struct{})
	go progressBar(out, &done, total, stop, finished)
	defer func() { close(stop); <-finished }()
	accept := "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*"
	req, _ := http.NewRequestWithContext(ctx, http.MethodHead, base+"/v2/demo/app/manifests/v1"+ns, nil)
	req.Header.Set("Accept", accept)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, 0, err
	}
	resp.Body.Close()
	if got := resp.Header.Get("Docker-Content-Digest"); got != img.Digest {
		return nil, 0, fmt.Errorf("resolve: status %s, digest %q", resp.Status, got)
	}
	if _, err := fetch.Blob(ctx, http.DefaultClient, base+"/v2/demo/app/manifests/"+img.Digest+ns, digest.Digest(img.Digest)); err != nil {
		return nil, 0, err
	}
	if _, err := fetch.Blob(ctx, http.DefaultClient, base+"/v2/demo/app/blobs/"+img.Config+ns, digest.Digest(img.Config)); err != nil {
		return nil, 0, err
	}
	res := make([]layerResult, len(img.Layers))
	errs := make([]error, len(img.Layers))
	sem := make(chan struct{}, 3)
	var wg sync.WaitGroup
	for i, l := range img.Layers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			d := digest.Digest(l.Digest)
			r, err := fetch.BlobCounting(ctx, http.DefaultClient, base+"/v2/demo/app/blobs/"+l.Digest+ns, d, &done)
			res[i] = layerResult{digest: d, size: l.Size, took: r.Total, ttfb: r.TTFB, source: r.Source}
			errs[i] = err
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return nil, 0, err
		}
	}
	return res, time.Since(start), nil
}

// sources asks the mirror where a blob's bytes came from.
func sources(ctx context.Context, mirror string, d digest.Digest) string {
	st, err := probe.Blob(ctx, mirror, d.String())
	if err != nil {
		return "?"
	}
	if len(st.Sources) == 0 {
		return "(" + st.State + ")"
	}
	var parts []string
	for k, v := range st.Sources {
		parts = append(parts, fmt.Sprintf("%s=%s", k, units.HumanSize(float64(v))))
	}
	sort.Strings(parts)
	return strings.Join(parts, " ")
}
