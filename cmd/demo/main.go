// Command demo runs registry-proxy's demonstration: an embedded upstream
// registry, a proxy, and an image pulled through it cold and warm.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/docker/go-units"

	"github.com/registry-proxy/registry-proxy/internal/demo"
)

func main() {
	layers := flag.String("layers", "2MiB,16MiB,64MiB,192MiB", "comma-separated layer sizes")
	pace := flag.String("pace", "50MB", "upstream bandwidth per connection per second (0: unpaced)")
	verbose := flag.Bool("v", false, "show the proxy's log")
	nodes := flag.Int("nodes", 3, "proxies in the cluster")
	flag.Parse()
	var sizes []int64
	for _, s := range strings.Split(*layers, ",") {
		n, err := units.RAMInBytes(strings.TrimSpace(s))
		if err != nil {
			fmt.Fprintln(os.Stderr, "demo: --layers:", err)
			os.Exit(2)
		}
		sizes = append(sizes, n)
	}
	bps, err := units.FromHumanSize(*pace)
	if err != nil {
		fmt.Fprintln(os.Stderr, "demo: --pace:", err)
		os.Exit(2)
	}
	lvl := slog.LevelWarn
	if *verbose {
		lvl = slog.LevelInfo
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	err = demo.Run(ctx, demo.Options{
		Layers:  sizes,
		Nodes:   *nodes,
		PaceBps: bps,
		Out:     os.Stdout,
		Logger:  slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl})),
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}
