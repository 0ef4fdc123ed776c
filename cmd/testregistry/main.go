// Command testregistry runs the test upstream registry (a real OCI registry
// from go-containerregistry, in memory) as its own process, for benchmarks
// that put it in a network namespace of its own. It pushes one random blob
// at start, prints {"digest":..., "size":...} on stdout, and serves the
// blob bytes it has sent (and when it last wrote any) at /_stats, with the
// bytes of each blob it pushed under "per_blob". With --basic-auth (and
// --token) it is private once everything is pushed.
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
	basic := flag.String("basic-auth", "", "USER:PASS: once pushed, every request needs these as basic auth (with --token: the token realm does)")
	token := flag.String("token", "", "once pushed, every request needs \"Authorization: Bearer TOKEN\", handed out by the realm at /token")
	control := flag.String("control", "", "address for the control API (testregistry.ControlHandler: GET /stats, POST /outage, /limit, /pace, /push, /tag, /private, /down, /reset); listening before the JSON line is printed")
	flag.Parse()
	user, pass, hasBasic := strings.Cut(*basic, ":")
	if *basic != "" && (!hasBasic || user == "") {
		fmt.Fprintln(os.Stderr, "testregistry: --basic-auth: want USER:PASS")
		os.Exit(2)
	}
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
	// Private from here on: pushing needed no credentials.
	if *token != "" {
		reg.SetToken(*token)
	}
	if *basic != "" {
		reg.SetCredentials(user, pass)
	}
	pushed := []string{d}
	if img != nil {
		pushed = append(pushed, img.Config)
		for _, l := range img.Layers {
			pushed = append(pushed, l.Digest)
		}
	}
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
		per := map[string]int64{}
		for _, d := range pushed {
			per[d] = reg.BytesOf(d)
		}
		json.NewEncoder(w).Encode(map[string]any{"blob_bytes": reg.BlobBytes(), "blob_gets": reg.BlobGets(), "last_blob_write_unix_ns": last, "per_blob": per})
	})
	mux.HandleFunc("POST /_reset", func(w http.ResponseWriter, _ *http.Request) { reg.ResetCounters() })
	go http.ListenAndServe(*stats, mux)
	if *control != "" {
		// A listener of its own: an outage (POST /outage) leaves it up.
		cln, err := net.Listen("tcp", *control)
		if err != nil {
			fmt.Fprintln(os.Stderr, "testregistry: --control:", err)
			os.Exit(1)
		}
		go http.Serve(cln, reg.ControlHandler())
	}
	json.NewEncoder(os.Stdout).Encode(map[string]any{"digest": d, "size": n, "url": reg.URL, "stats": "http://" + *stats, "image": img})
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	<-ctx.Done()
}
