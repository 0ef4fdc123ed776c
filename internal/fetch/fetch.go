// Package fetch downloads one blob as a registry client does, checking it
// against its digest and timing it, for the demo and the benchmarks.
package fetch

import (
	"context"
	"fmt"
	"io"
	"net/http"
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
	v := d.Verifier()
	buf := make([]byte, 1<<20)
	n, rerr := resp.Body.Read(buf)
	ttfb := time.Since(start)
	v.Write(buf[:n])
	if rerr != nil && rerr != io.EOF {
		return Result{}, fmt.Errorf("GET %s: %w", url, rerr)
	}
	rest, err := io.CopyBuffer(v, resp.Body, buf)
	if err != nil {
		return Result{}, fmt.Errorf("GET %s: %w", url, err)
	}
	if !v.Verified() {
		return Result{}, fmt.Errorf("GET %s: content does not match %s", url, d)
	}
	return Result{Bytes: int64(n) + rest, TTFB: ttfb, Total: time.Since(start), Source: resp.Header.Get("X-Registry-Proxy-Source")}, nil
}
