package integration

import (
	"context"
	"flag"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/docker/go-units"

	"github.com/registry-proxy/registry-proxy/internal/netlab"
	"github.com/registry-proxy/registry-proxy/internal/relay"
	"github.com/registry-proxy/registry-proxy/internal/report"
)

var (
	lbChunk = flag.String("lab-chunk", "256KiB", "BenchmarkLabBound: bytes a node receives whole before it relays them (the engine's piece is 4 MiB or more)")
)

// BenchmarkLabBound measures what the cluster harness's network itself
// costs: the same lab as BenchmarkCluster (its -cluster-nodes, -cluster-size,
// -cluster-up, -cluster-origin, -cluster-runs), the blob's bytes sent by
// relay's schedules, which reach the Kumar–Ross bound on paper, with no
// proxy, hashing or disk. Their max ÷ bound is the harness's floor for any
// engine on equal links: the yardstick for scenario a. (Its schedules are
// not optimal for unequal uploads, so it says nothing of b and e.)
func BenchmarkLabBound(b *testing.B) {
	needRoot(b)
	size, up, origin := clusterLinks(b)
	chunk, err := units.RAMInBytes(*lbChunk)
	if err != nil {
		b.Fatal(err)
	}
	over := map[relay.Schedule][]float64{}
	for range b.N {
		for run := range *cbRuns {
			for _, sched := range []relay.Schedule{relay.Split, relay.Dealt} {
				x := labBoundRun(b, relay.Options{Size: size, Chunk: chunk, Schedule: sched}, *cbNodes, up, origin)
				over[sched] = append(over[sched], x)
				b.Logf("run %d, %s: max ÷ bound %.3f", run+1, sched, x)
			}
		}
	}
	for sched, xs := range over {
		b.ReportMetric(report.MedianOf(xs), string(sched)+"-max/bound")
	}
	b.ReportMetric(0, "ns/op")
}

// labBoundRun builds the lab and returns one schedule's max ÷ bound.
func labBoundRun(tb testing.TB, opts relay.Options, nodes int, up, origin int64) float64 {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	u := &undoer{}
	unregister := onInterrupt(u.run)
	defer func() { unregister(); u.run() }()
	lab, oh := newClusterLab(tb, ctx, u, origin)
	var eps []relay.Endpoint
	var ups, downs []float64
	for i := range nodes {
		lim := netlab.Limits{Up: up, Down: up}
		h, err := lab.AddHost(ctx, i+2, lim)
		if err != nil {
			tb.Fatal(err)
		}
		eps = append(eps, relay.Endpoint{IP: h.IP, NS: h})
		ups, downs = append(ups, float64(lim.Up)), append(downs, float64(lim.Down))
	}
	res, err := relay.Run(ctx, relay.Endpoint{IP: oh.IP, NS: oh}, eps, opts)
	if err != nil {
		tb.Fatal(err)
	}
	bound := report.KumarRoss(float64(opts.Size), float64(origin), ups, downs)
	var ts []string
	for _, d := range res.Done {
		ts = append(ts, fmt.Sprintf("%.2f", d.Seconds()))
	}
	tb.Logf("%s: nodes done at %s s; bound %.2f s", opts.Schedule, strings.Join(ts, " "), bound)
	return res.Max().Seconds() / bound
}
