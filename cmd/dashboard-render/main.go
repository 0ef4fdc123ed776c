// Command dashboard-render draws a preview of a Grafana dashboard from a
// Prometheus server's answers to its queries: a static HTML page with each
// panel where its gridPos puts it, which headless Chromium turns into the
// picture in docs/metrics.md (make dashboard-shot). It prints the page's
// height in pixels. A preview of the data, not Grafana.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/registry-proxy/registry-proxy/internal/dashboard"
)

func main() {
	file := flag.String("dashboard", "deploy/helm/registry-proxy/dashboards/registry-proxy.json", "the dashboard's JSON")
	prom := flag.String("prometheus", "http://127.0.0.1:9090", "Prometheus' base URL")
	start := flag.String("start", "", "start of the time range, RFC 3339 (default: -last before -end)")
	end := flag.String("end", "", "end of the time range, RFC 3339 (default: now)")
	last := flag.Duration("last", time.Hour, "the time range's length without -start")
	step := flag.Duration("step", 2*time.Second, "range queries' resolution")
	rate := flag.Duration("rate-interval", 10*time.Second, "$__rate_interval: four scrape intervals at least")
	width := flag.Int("width", 1600, "page width in pixels")
	caption := flag.String("caption", "", "line under the title: what run the data comes from")
	out := flag.String("out", "dashboard.html", "the HTML page to write")
	var vars []string
	flag.Func("var", "NAME=VALUE of a template variable as it goes into PromQL (repeatable; default: All)", func(s string) error {
		if !strings.Contains(s, "=") {
			return fmt.Errorf("want NAME=VALUE")
		}
		vars = append(vars, s)
		return nil
	})
	flag.Parse()
	if err := run(*file, *prom, *start, *end, *last, *step, *rate, *width, *caption, *out, vars); err != nil {
		fmt.Fprintln(os.Stderr, "dashboard-render:", err)
		os.Exit(1)
	}
}

func run(file, prom, start, end string, last, step, rate time.Duration, width int, caption, out string, vars []string) error {
	d, err := dashboard.Load(file)
	if err != nil {
		return err
	}
	o := dashboard.Options{Prometheus: dashboard.Prometheus{URL: strings.TrimSuffix(prom, "/")}, Step: step, RateInterval: rate,
		Width: width, Caption: caption, Vars: map[string]string{}, End: time.Now()}
	if end != "" {
		if o.End, err = time.Parse(time.RFC3339, end); err != nil {
			return fmt.Errorf("-end: %w", err)
		}
	}
	o.Start = o.End.Add(-last)
	if start != "" {
		if o.Start, err = time.Parse(time.RFC3339, start); err != nil {
			return fmt.Errorf("-start: %w", err)
		}
	}
	for _, v := range vars {
		name, value, _ := strings.Cut(v, "=")
		o.Vars[name] = value
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	page, height, err := dashboard.Render(ctx, d, o)
	if err != nil {
		return err
	}
	if err := os.WriteFile(out, page, 0o644); err != nil {
		return err
	}
	fmt.Println(height)
	return nil
}
