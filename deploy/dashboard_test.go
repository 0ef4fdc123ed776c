package deploy_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/config"
	"github.com/registry-proxy/registry-proxy/internal/dashboard"
	"github.com/registry-proxy/registry-proxy/internal/fetch"
	"github.com/registry-proxy/registry-proxy/internal/ports"
	"github.com/registry-proxy/registry-proxy/internal/probe"
	"github.com/registry-proxy/registry-proxy/internal/testregistry"
	"github.com/registry-proxy/registry-proxy/node"
	"github.com/registry-proxy/registry-proxy/p2p/trust"
	"github.com/registry-proxy/registry-proxy/piece"
)

const (
	dashboardFile = chart + "/dashboards/registry-proxy.json"
	metricsDoc    = "../docs/metrics.md"
)

// documented reads docs/metrics.md's tables: metric name -> type.
func documented(t *testing.T) map[string]string {
	t.Helper()
	f, err := os.Open(metricsDoc)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	row := regexp.MustCompile("^\\| `([a-zA-Z_:][a-zA-Z0-9_:]*)` \\| (counter|gauge|histogram|summary) \\|")
	docs := map[string]string{}
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		if m := row.FindStringSubmatch(sc.Text()); m != nil {
			docs[m[1]] = m[2]
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	if len(docs) < 10 {
		t.Fatalf("%d metrics read from %s: has the table's format changed?", len(docs), metricsDoc)
	}
	return docs
}

// family is the metric family a name the dashboard uses belongs to: the
// name itself, or for a histogram's or summary's series the family without
// _bucket, _sum or _count.
func family(name string, docs map[string]string) (string, bool) {
	if _, ok := docs[name]; ok {
		return name, true
	}
	for _, suffix := range []string{"_bucket", "_sum", "_count"} {
		base, ok := strings.CutSuffix(name, suffix)
		if !ok {
			continue
		}
		if typ := docs[base]; typ == "histogram" || typ == "summary" && suffix != "_bucket" {
			return base, true
		}
	}
	return "", false
}

// checkDashboard lists what is wrong with d: variables, panel ids, data
// sources, the grid, and every metric name in its queries that
// docs/metrics.md does not list or a node does not register (served).
func checkDashboard(d *dashboard.Dashboard, docs map[string]string, served []string) []error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if d.SchemaVersion < 36 {
		bad("schemaVersion %d: want 36 or later (data sources by uid)", d.SchemaVersion)
	}
	vars := map[string]dashboard.Variable{}
	for _, v := range d.Templating.List {
		vars[v.Name] = v
	}
	if v, ok := vars["datasource"]; !ok || v.Type != "datasource" || v.QueryText() != "prometheus" {
		bad("no variable datasource of type datasource for prometheus: %+v", v)
	}
	if v, ok := vars["instance"]; !ok || v.Type != "query" || v.Datasource == nil || v.Datasource.UID != "${datasource}" {
		bad("no query variable instance on ${datasource}: %+v", v)
	}
	usesVariable := func(ds *dashboard.Datasource) bool {
		return ds != nil && ds.Type == "prometheus" && ds.UID == "${datasource}"
	}
	ids := map[int]bool{}
	type cell struct{ x, y int }
	taken := map[cell]int{}
	for _, p := range d.AllPanels() {
		where := fmt.Sprintf("panel %d (%s)", p.ID, p.Title)
		if p.ID <= 0 || ids[p.ID] {
			bad("%s: id not unique and positive", where)
		}
		ids[p.ID] = true
		g := p.GridPos
		if g.W <= 0 || g.H <= 0 || g.X < 0 || g.Y < 0 || g.X+g.W > 24 {
			bad("%s: gridPos %+v off the 24-column grid", where, g)
		}
		for x := g.X; x < g.X+g.W; x++ {
			for y := g.Y; y < g.Y+g.H; y++ {
				if other, ok := taken[cell{x, y}]; ok {
					bad("%s overlaps panel %d at %d,%d", where, other, x, y)
					x, y = g.X+g.W, g.Y+g.H
					continue
				}
				taken[cell{x, y}] = p.ID
			}
		}
		if p.Type == "row" {
			if len(p.Targets) > 0 {
				bad("%s: a row with queries", where)
			}
			continue
		}
		if !usesVariable(p.Datasource) {
			bad("%s: datasource %+v, want the ${datasource} variable", where, p.Datasource)
		}
		if len(p.Targets) == 0 {
			bad("%s: no query", where)
		}
		for _, tg := range p.Targets {
			if tg.Datasource != nil && !usesVariable(tg.Datasource) {
				bad("%s %s: datasource %+v, want the ${datasource} variable", where, tg.RefID, tg.Datasource)
			}
			if tg.Expr != "" && !strings.Contains(tg.Expr, `instance=~"$instance"`) {
				bad("%s %s: not filtered by the instance variable: %s", where, tg.RefID, tg.Expr)
			}
		}
	}
	for _, q := range d.Queries() {
		names, err := dashboard.MetricNames(q.Expr)
		if err != nil {
			bad("%s: %v", q.Where, err)
			continue
		}
		if len(names) == 0 && strings.HasPrefix(q.Where, "panel") {
			bad("%s: no metric in %q", q.Where, q.Expr)
		}
		for _, name := range names {
			fam, ok := family(name, docs)
			if !ok {
				bad("%s: %s is not in docs/metrics.md", q.Where, name)
				continue
			}
			if !slices.Contains(served, fam) {
				bad("%s: %s is not registered on a node", q.Where, fam)
			}
		}
	}
	return errs
}

// startNodes starts n nodes with peers on loopback in this process,
// against reg as registry test.invalid, and waits until they see each
// other. Their containerd socket is a path nobody serves: containerd's
// content store is on, as the chart has it, and empty.
func startNodes(t *testing.T, reg *testregistry.Registry, n int) []*node.Node {
	t.Helper()
	secret := filepath.Join(t.TempDir(), "cluster-secret")
	if err := os.WriteFile(secret, []byte(trust.NewSecret()+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	lvl := slog.LevelError
	if testing.Verbose() {
		lvl = slog.LevelInfo
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
	var nodes []*node.Node
	var admins, peerAddrs []string
	for i := range n {
		cfg := config.Default()
		cfg.Listen = "127.0.0.1:0"
		cfg.Admin.Listen = "127.0.0.1:0"
		cfg.DataDir = t.TempDir()
		cfg.Upstream.Registries = map[string]string{"test.invalid": reg.URL}
		cfg.Containerd.Address = filepath.Join(t.TempDir(), "containerd.sock")
		peer, err := ports.FreePair("127.0.0.1")
		if err != nil {
			t.Fatal(err)
		}
		cfg.P2P.PeerListen = peer
		cfg.P2P.SecretFile = secret
		cfg.P2P.NodeID = fmt.Sprintf("node-%d", i+1)
		cfg.P2P.Join = slices.Clone(peerAddrs)
		peerAddrs = append(peerAddrs, peer)
		nd, err := node.Start(context.Background(), cfg, log)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { nd.Shutdown(context.Background()) })
		nodes = append(nodes, nd)
		admins = append(admins, "http://"+nd.AdminAddr())
	}
	if err := probe.WaitMembers(context.Background(), admins, n, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	return nodes
}

// pull fetches img through the mirror at base as containerd does: the
// manifest by tag, then the config and layers by digest, each verified.
func pull(t *testing.T, base string, img *testregistry.Image) {
	t.Helper()
	ctx := context.Background()
	ns := "?ns=test.invalid"
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, base+"/v2/"+img.Repo+"/manifests/"+img.Tag+ns, nil)
	req.Header.Set("Accept", "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("manifest %s:%s through %s: %s", img.Repo, img.Tag, base, resp.Status)
	}
	blobs := []string{img.Config}
	for _, l := range img.Layers {
		blobs = append(blobs, l.Digest)
	}
	for _, d := range blobs {
		if _, err := fetch.Blob(ctx, http.DefaultClient, base+"/v2/"+img.Repo+"/blobs/"+d+ns, digest.Digest(d)); err != nil {
			t.Fatalf("blob %s through %s: %v", d, base, err)
		}
	}
}

// scrape returns a node's /metrics in Prometheus' text format.
func scrape(t *testing.T, nd *node.Node) string {
	t.Helper()
	resp, err := http.Get("http://" + nd.AdminAddr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("/metrics: %s %v", resp.Status, err)
	}
	return string(b)
}

// The chart's dashboard uses only metrics docs/metrics.md lists and nodes
// serve, each panel on the data source variable, ids unique. The nodes are
// real (two, with peers, in this process), an image is pulled through both,
// and what they register is read from their own registry: every family,
// vectors nothing has been counted in yet included.
func TestDashboard(t *testing.T) {
	d, err := dashboard.Load(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	docs := documented(t)
	reg, err := testregistry.Start(testregistry.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close() })
	img, err := reg.PushImage(context.Background(), "library/app", "v1", []int64{1000, 3*piece.MinSize + 12345}, 1)
	if err != nil {
		t.Fatal(err)
	}
	nodes := startNodes(t, reg, 2)
	for _, nd := range nodes {
		pull(t, "http://"+nd.Addr(), img)
	}
	served, err := nodes[0].Metrics().Families()
	if err != nil {
		t.Fatal(err)
	}
	for _, err := range checkDashboard(d, docs, served) {
		t.Error(err)
	}

	// What a scrape after the pulls shows: every name the dashboard uses
	// whose family has series is served under that very name (a
	// histogram's _bucket, _sum and _count), and the panels of bytes by
	// source and of latency have data.
	var exposition strings.Builder
	for _, nd := range nodes {
		exposition.WriteString(scrape(t, nd))
	}
	samples := map[string]bool{}
	typed := map[string]bool{}
	for _, line := range strings.Split(exposition.String(), "\n") {
		if f, ok := strings.CutPrefix(line, "# TYPE "); ok {
			typed[strings.Fields(f)[0]] = true
		} else if line != "" && !strings.HasPrefix(line, "#") {
			samples[strings.FieldsFunc(line, func(r rune) bool { return r == '{' || r == ' ' })[0]] = true
		}
	}
	var used []string
	for _, q := range d.Queries() {
		names, _ := dashboard.MetricNames(q.Expr)
		for _, name := range names {
			if fam, ok := family(name, docs); ok && typed[fam] && !samples[name] {
				t.Errorf("%s: family %s is scraped, but not as %s", q.Where, fam, name)
			}
			used = append(used, name)
		}
	}
	for _, want := range []string{"registry_proxy_blob_bytes_total", "registry_proxy_blob_download_duration_seconds_bucket",
		"registry_proxy_piece_duration_seconds_bucket", "registry_proxy_http_requests_total", "registry_proxy_store_bytes"} {
		if !slices.Contains(used, want) || !samples[want] {
			t.Errorf("%s: used by the dashboard %v, scraped after a pull %v", want, slices.Contains(used, want), samples[want])
		}
	}

	// The check fails what it should: a made-up metric, one a node serves
	// but docs/metrics.md does not list (or the reverse), a panel on
	// another data source, a duplicate id.
	raw, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		mutate func(d map[string]any)
		docs   func(docs map[string]string)
		want   string
	}{
		{name: "made-up metric", want: "registry_proxy_made_up_total is not in docs/metrics.md",
			mutate: func(d map[string]any) {
				setExpr(d, `sum(rate(registry_proxy_made_up_total{instance=~"$instance"}[$__rate_interval]))`)
			}},
		{name: "documented, not served", want: "registry_proxy_made_up_total is not registered on a node",
			mutate: func(d map[string]any) {
				setExpr(d, `sum(rate(registry_proxy_made_up_total{instance=~"$instance"}[$__rate_interval]))`)
			},
			docs: func(docs map[string]string) { docs["registry_proxy_made_up_total"] = "counter" }},
		{name: "served, not documented", want: "registry_proxy_store_bytes is not in docs/metrics.md",
			docs: func(docs map[string]string) { delete(docs, "registry_proxy_store_bytes") }},
		{name: "histogram suffix on a counter", want: "registry_proxy_blob_bytes_total_count is not in docs/metrics.md",
			mutate: func(d map[string]any) {
				setExpr(d, `sum(rate(registry_proxy_blob_bytes_total_count{instance=~"$instance"}[$__rate_interval]))`)
			}},
		{name: "unknown function", want: `unknown function "rat"`,
			mutate: func(d map[string]any) { setExpr(d, `rat(registry_proxy_store_bytes{instance=~"$instance"}[5m])`) }},
		{name: "fixed data source", want: "want the ${datasource} variable",
			mutate: func(d map[string]any) {
				panel(d)["datasource"] = map[string]any{"type": "prometheus", "uid": "P1809F7CD0C75ACF3"}
			}},
		{name: "duplicate id", want: "id not unique",
			mutate: func(d map[string]any) { panel(d)["id"] = d["panels"].([]any)[0].(map[string]any)["id"] }},
		{name: "no instance filter", want: "not filtered by the instance variable",
			mutate: func(d map[string]any) { setExpr(d, `sum(registry_proxy_store_bytes)`) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var m map[string]any
			if err := json.Unmarshal(raw, &m); err != nil {
				t.Fatal(err)
			}
			if tc.mutate != nil {
				tc.mutate(m)
			}
			b, _ := json.Marshal(m)
			mutated, err := dashboard.Parse(b)
			if err != nil {
				t.Fatal(err)
			}
			docs := documented(t)
			if tc.docs != nil {
				tc.docs(docs)
			}
			errs := checkDashboard(mutated, docs, served)
			if !slices.ContainsFunc(errs, func(err error) bool { return strings.Contains(err.Error(), tc.want) }) {
				t.Errorf("want an error with %q, got %v", tc.want, errs)
			}
		})
	}
}

// panel is the dashboard's last panel (a timeseries, not a row).
func panel(d map[string]any) map[string]any {
	ps := d["panels"].([]any)
	return ps[len(ps)-1].(map[string]any)
}

func setExpr(d map[string]any, expr string) {
	panel(d)["targets"].([]any)[0].(map[string]any)["expr"] = expr
}
