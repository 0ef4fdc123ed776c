package inspect

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/docker/go-units"

	"github.com/registry-proxy/registry-proxy/preheat"
)

// Preheat posts a preheat request to the node and calls fn with each event
// until done; an error when the node refused it or the answer broke off.
func (c Client) Preheat(ctx context.Context, req preheat.Request, fn func(preheat.Event)) error {
	body, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("inspect: %w", err)
	}
	// A preheat takes as long as it takes: no timeout.
	_, resp, err := c.do(ctx, http.MethodPost, "/preheat", bytes.NewReader(body), 0)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return fmt.Errorf("preheat refused: %s: %s", resp.Status, strings.TrimSpace(string(b)))
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		var e preheat.Event
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			return fmt.Errorf("preheat: bad event %q: %w", sc.Text(), err)
		}
		fn(e)
		if e.Type == "done" {
			return nil
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("preheat: the answer broke off: %w", err)
	}
	return fmt.Errorf("preheat: the answer ended before done")
}

// PreheatView follows a preheat's events: a progress bar per blob (its
// bytes on every node), and at the end a table of nodes × blobs.
type PreheatView struct {
	mu      sync.Mutex
	nodes   []string
	blobs   []preheat.Blob
	done    map[[2]string]int64  // node, digest -> bytes
	results map[[2]string]string // node, digest -> "" ok, else the error
	elapsed float64
	failed  int
	over    bool
}

// Add records an event.
func (v *PreheatView) Add(e preheat.Event) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.done == nil {
		v.done, v.results = map[[2]string]int64{}, map[[2]string]string{}
	}
	k := [2]string{e.Node, e.Digest}
	switch e.Type {
	case "plan":
		v.nodes, v.blobs = e.Nodes, e.Blobs
	case "progress":
		v.done[k] = e.Done
	case "result":
		v.done[k] = e.Done
		v.results[k] = e.Error
		if e.Error == "" {
			v.results[k] = "ok"
		}
	case "done":
		v.elapsed, v.failed, v.over = e.Elapsed, e.Failed, true
	}
}

// Failed is the number of (node, blob) fetches that failed, once done.
func (v *PreheatView) Failed() int {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.failed
}

// WriteProgress writes a bar per blob: its bytes on all nodes together.
func (v *PreheatView) WriteProgress(w io.Writer) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "BLOB\tIMAGE\tSIZE\tNODES DONE\tPROGRESS\n")
	for _, b := range v.blobs {
		var bytes int64
		ok := 0
		for _, n := range v.nodes {
			k := [2]string{n, b.Digest}
			bytes += v.done[k]
			if v.results[k] == "ok" {
				ok++
			}
		}
		pct := 100.0
		if total := b.Size * int64(len(v.nodes)); total > 0 {
			pct = 100 * float64(bytes) / float64(total)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d/%d\t%5.1f%% %s\n", short(b.Digest), b.Image, units.HumanSize(float64(b.Size)), ok, len(v.nodes), pct, bar(pct, 20))
	}
	return tw.Flush()
}

// WriteTable writes the nodes × blobs table: ok, or why a fetch failed.
func (v *PreheatView) WriteTable(w io.Writer) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprint(tw, "NODE")
	for _, b := range v.blobs {
		fmt.Fprintf(tw, "\t%s", short(b.Digest))
	}
	fmt.Fprintln(tw)
	var why []string
	for _, n := range v.nodes {
		fmt.Fprint(tw, n)
		for _, b := range v.blobs {
			r := v.results[[2]string{n, b.Digest}]
			switch r {
			case "ok":
			case "":
				r = "-"
			default:
				why = append(why, fmt.Sprintf("%s %s: %s", n, short(b.Digest), r))
				r = "FAILED"
			}
			fmt.Fprintf(tw, "\t%s", r)
		}
		fmt.Fprintln(tw)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, s := range why {
		fmt.Fprintln(w, s)
	}
	var total int64
	for _, b := range v.blobs {
		total += b.Size
	}
	_, err := fmt.Fprintf(w, "%d blobs (%s) on %d nodes in %s; %d failed\n", len(v.blobs), units.HumanSize(float64(total)), len(v.nodes),
		(time.Duration(v.elapsed * float64(time.Second))).Round(time.Millisecond), v.failed)
	return err
}
