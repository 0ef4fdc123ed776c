// Package fetch downloads one blob as a registry client does, checking it
// against its digest and timing it, for the demo and the benchmarks.
package fetch

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"
)

// Result is one download.
type Result struct {
	Bytes  int64
	TTFB   time.Duration // request sent to first body byte
	Total  time.Duration
	Source string // the mirror's X-Registry-Proxy-Source header
}

// Blob GETs url and verifies the body against d.
func Blob(ctx context.Context, client *http.Client, url string, d digest.Digest) (Result, error) {
	return BlobCounting(ctx, client, url, d, nil)
}

// BlobCounting is Blob adding the body's bytes to n as they arrive (n may
// be nil): a progress bar's source.
func BlobCounting(ctx context.Context, client *http.Client, url string, d digest.Digest, n *atomic.Int64) (Result, error) {
	start := time.Now()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return Result{}, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return Result{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return Result{}, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	var v io.Writer = d.Verifier()
	verified := v.(digest.Verifier)
	if n != nil {
		v = io.MultiWriter(v, counter{n})
	}
	buf := make([]byte, 1<<20)
	first, rerr := resp.Body.Read(buf)
	ttfb := time.Since(start)
	v.Write(buf[:first])
	if rerr != nil && rerr != io.EOF {
		return Result{}, fmt.Errorf("GET %s: %w", url, rerr)
	}
	rest, err := io.CopyBuffer(v, resp.Body, buf)
	if err != nil {
		return Result{}, fmt.Errorf("GET %s: %w", url, err)
	}
	if !verified.Verified() {
		return Result{}, fmt.Errorf("GET %s: content does not match %s", url, d)
	}
	return Result{Bytes: int64(first) + rest, TTFB: ttfb, Total: time.Since(start), Source: resp.Header.Get("X-Registry-Proxy-Source")}, nil
}

type counter struct{ n *atomic.Int64 }

func (c counter) Write(b []byte) (int, error) {
	c.n.Add(int64(len(b)))
	return len(b), nil
}

// Target is one blob to fetch: its URL and digest.
type Target struct {
	URL    string
	Digest digest.Digest
}

// All fetches every target at once (all requests released together) and
// verifies each; it returns how long they took together and the errors.
func All(ctx context.Context, client *http.Client, targets []Target) (time.Duration, []error) {
	start := make(chan struct{})
	errs := make([]error, len(targets))
	var wg sync.WaitGroup
	for i, tg := range targets {
		wg.Go(func() {
			<-start
			_, errs[i] = Blob(ctx, client, tg.URL, tg.Digest)
		})
	}
	t0 := time.Now()
	close(start)
	wg.Wait()
	var out []error
	for _, err := range errs {
		if err != nil {
			out = append(out, err)
		}
	}
	return time.Since(t0), out
}
