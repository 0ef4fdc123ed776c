// Command benchplots draws the plots of docs/benchmarks.md from its headline
// figures (`make bench-plots`).
package main

import (
	"flag"
	"fmt"
	"log/slog"
	"os"

	"github.com/registry-proxy/registry-proxy/internal/benchplot"
)

func main() {
	data := flag.String("data", "docs/benchmarks/headline.tsv", "the headline figures, tab-separated")
	out := flag.String("out", "docs/benchmarks", "directory the PNGs are written to")
	flag.Parse()
	if err := run(*data, *out); err != nil {
		fmt.Fprintln(os.Stderr, "benchplots:", err)
		os.Exit(1)
	}
}

func run(data, out string) error {
	f, err := os.Open(data)
	if err != nil {
		return err
	}
	defer f.Close()
	figs, err := benchplot.Read(f)
	if err != nil {
		return err
	}
	files, err := benchplot.Write(out, figs)
	for _, p := range files {
		slog.Info("wrote", "file", p)
	}
	return err
}
