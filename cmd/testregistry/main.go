// Command testregistry runs the test upstream registry (a real OCI registry
// from go-containerregistry, in memory) as its own process, for benchmarks
// that put it in a network namespace of its own. It pushes one random blob
// at start, prints {"digest":..., "size":...} on stdout, and serves the
// blob bytes it has sent (and when it last wrote any) at /_stats.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/docker/go-units"

	"github.com/registry-proxy/registry-proxy/internal/testregistry"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:5000", "address to serve on")
	stats := flag.String("stats-listen", "", "address for /_stats (default: listen port + 1)")
	size := flag.String("blob", "256MiB", "size of the random blob pushed at start (repository bench/blob)")
	seed := flag.Uint64("seed", 1, "seed of the blob's bytes")
	image := flag.String("image", "", "also push image bench/image:latest with one uncompressed layer per size, e.g. 128MiB,64MiB")
	flag.Parse()
	n, err := units.RAMInBytes(*size)
	if err != nil {
		fmt.Fprintln(os.Stderr, "testregistry: --blob:", err)
		os.Exit(2)
	}
	reg, err := testregistry.Start(testregistry.Options{Addr: *listen})
	if err != nil {
		fmt.Fprintln(os.Stderr, "testregistry:", err)
		os.Exit(1)
	}
	defer reg.Close()
	d, err := reg.PushBlob(context.Background(), "bench/blob", testregistry.RandomBytes(n, *seed))
	if err != nil {
		fmt.Fprintln(os.Stderr, "testregistry:", err)
		os.Exit(1)
	}
	var img *testregistry.Image
	if *image != "" {
		var files []int64
		for _, f := range strings.Split(*image, ",") {
			n, err := units.RAMInBytes(strings.TrimSpace(f))
			if err != nil {
				fmt.Fprintln(os.Stderr, "testregistry: --image:", err)
				os.Exit(2)
			}
			files = append(files, n)
		}
		if img, err = reg.PushImage(context.Background(), "bench/image", "latest", files, *seed); err != nil {
			fmt.Fprintln(os.Stderr, "testregistry:", err)
			os.Exit(1)
		}
	}
	reg.ResetCounters()
	if *stats == "" {
		host, port, _ := net.SplitHostPort(reg.Host)
		var p int
		fmt.Sscan(port, &p)
		*stats = net.JoinHostPort(host, fmt.Sprint(p+1))
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /_stats", func(w http.ResponseWriter, _ *http.Request) {
		var last int64
		if t := reg.LastBlobWrite(); !t.IsZero() {
			last = t.UnixNano()
		}
		json.NewEncoder(w).Encode(map[string]int64{"blob_bytes": reg.BlobBytes(), "blob_gets": reg.BlobGets(), "last_blob_write_unix_ns": last})
	})
	mux.HandleFunc("POST /_reset", func(w http.ResponseWriter, _ *http.Request) { reg.ResetCounters() })
	go http.ListenAndServe(*stats, mux)
	json.NewEncoder(os.Stdout).Encode(map[string]any{"digest": d, "size": n, "url": reg.URL, "stats": "http://" + *stats, "image": img})
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	<-ctx.Done()
}
