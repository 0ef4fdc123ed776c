// Package inspect is what a node's admin listener shows about it, /debug/members
// and /debug/tasks: the views the node serves, and the client and tables of
// `registry-proxy peers` and `registry-proxy status`.
package inspect

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/docker/go-units"

	"github.com/registry-proxy/registry-proxy/p2p/pb"
	"github.com/registry-proxy/registry-proxy/task"
)

// Member is one member as /debug/members shows it: with the host state it
// last streamed to this node and the weight this node gives it.
type Member struct {
	ID       string        `json:"id"`
	Addr     string        `json:"addr"`
	Self     bool          `json:"self,omitempty"`
	Followed bool          `json:"followed"`
	State    *pb.HostState `json:"state,omitempty"`
	StateAge float64       `json:"state_age_seconds,omitempty"`
	Weight   float64       `json:"weight,omitempty"`
}

// Client reads one node's admin listener.
type Client struct {
	// Base is the listener's URL, http://127.0.0.1:5001.
	Base string
	HTTP *http.Client
}

// Members returns the node's view of the cluster.
func (c Client) Members(ctx context.Context) ([]Member, error) {
	var ms []Member
	return ms, c.get(ctx, "/debug/members", &ms)
}

// Tasks returns the node's downloads in flight.
func (c Client) Tasks(ctx context.Context) ([]task.Stats, error) {
	var ts []task.Stats
	return ts, c.get(ctx, "/debug/tasks", &ts)
}

// do sends a request to the admin listener; timeout bounds it when the
// Client has no HTTP client of its own (0: none).
func (c Client) do(ctx context.Context, method, path string, body io.Reader, timeout time.Duration) (*http.Request, *http.Response, error) {
	hc := c.HTTP
	if hc == nil {
		hc = &http.Client{Timeout: timeout}
	}
	req, err := http.NewRequestWithContext(ctx, method, strings.TrimSuffix(c.Base, "/")+path, body)
	if err != nil {
		return nil, nil, fmt.Errorf("inspect: %w", err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, nil, fmt.Errorf("inspect: is registry-proxy running with its admin listener there? %w", err)
	}
	return req, resp, nil
}

func (c Client) get(ctx context.Context, path string, v any) error {
	req, resp, err := c.do(ctx, http.MethodGet, path, nil, 10*time.Second)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("inspect: %s: %s %s", req.URL, resp.Status, strings.TrimSpace(string(b)))
	}
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		return fmt.Errorf("inspect: %s: %w", req.URL, err)
	}
	return nil
}

func rate(bps uint64) string {
	if bps == 0 {
		return "-"
	}
	return units.HumanSize(float64(bps)) + "/s"
}

// WritePeers prints the members as a table: this node first, then by
// weight, highest first.
func WritePeers(w io.Writer, ms []Member) error {
	ms = slices.Clone(ms)
	slices.SortStableFunc(ms, func(a, b Member) int {
		switch {
		case a.Self != b.Self:
			if a.Self {
				return -1
			}
			return 1
		case a.Weight != b.Weight:
			if a.Weight > b.Weight {
				return -1
			}
			return 1
		}
		return strings.Compare(a.ID, b.ID)
	})
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tADDRESS\tUPLOAD\tMAX UPLOAD\tDOWNLOAD\tUPLOADS\tDISK READ\tFREE\tSTATE AGE\tWEIGHT")
	for _, m := range ms {
		if m.Self {
			fmt.Fprintf(tw, "%s (self)\t%s\t\t\t\t\t\t\t\t\n", m.ID, m.Addr)
			continue
		}
		if m.State == nil {
			fmt.Fprintf(tw, "%s\t%s\t-\t-\t-\t-\t-\t-\tno state\t%s/s\n", m.ID, m.Addr, units.HumanSize(m.Weight))
			continue
		}
		st := m.State
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d/%d\t%s\t%s\t%.1fs\t%s/s\n", m.ID, m.Addr,
			rate(st.GetTxBandwidth()), rate(st.GetMaxTxBandwidth()), rate(st.GetRxBandwidth()),
			st.GetUploadsInFlight(), st.GetUploadLimit(), rate(st.GetDiskReadBandwidth()),
			units.HumanSize(float64(st.GetFreeBytes())), m.StateAge, units.HumanSize(m.Weight))
	}
	return tw.Flush()
}

// WriteStatus prints the downloads in flight: progress and bytes by source.
func WriteStatus(w io.Writer, ts []task.Stats, upstreamID string) error {
	if len(ts) == 0 {
		_, err := fmt.Fprintln(w, "no downloads in flight")
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "BLOB\tREPOSITORY\tSIZE\tDONE\tFROM UPSTREAM\tFROM PEERS\tPEERS\tELAPSED\tRATE")
	for _, t := range ts {
		var up, peers int64
		n := 0
		for src, b := range t.Sources {
			if src == upstreamID {
				up += b
				continue
			}
			peers += b
			n++
		}
		done := up + peers
		pct := 0.0
		if t.Size > 0 {
			pct = 100 * float64(done) / float64(t.Size)
		}
		r := "-"
		if secs := t.Duration.Seconds(); secs > 0 {
			r = units.HumanSize(float64(done)/secs) + "/s"
		}
		repo := t.Repo
		if t.Registry != "" {
			repo = t.Registry + "/" + t.Repo
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%5.1f%% %s\t%s\t%s\t%d\t%s\t%s\n", short(t.Digest.String()), repo, units.HumanSize(float64(t.Size)),
			pct, bar(pct, 20), units.HumanSize(float64(up)), units.HumanSize(float64(peers)), n, t.Duration.Round(100*time.Millisecond), r)
	}
	return tw.Flush()
}

func short(d string) string {
	if i := strings.IndexByte(d, ':'); i >= 0 && len(d) > i+13 {
		return d[:i+13]
	}
	return d
}

func bar(pct float64, width int) string {
	n := min(max(int(pct/100*float64(width)+0.5), 0), width)
	return "[" + strings.Repeat("#", n) + strings.Repeat(".", width-n) + "]"
}

// IsTerminal reports whether w is a terminal, where a display may redraw.
func IsTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

// Watch calls render into a buffer and writes it to w, every interval until
// ctx ends, clearing the screen before each frame as top does; once (or
// interval 0) renders a single time. A render error ends it.
func Watch(ctx context.Context, w io.Writer, interval time.Duration, once bool, render func(io.Writer) error) error {
	for {
		var b strings.Builder
		if err := render(&b); err != nil {
			return err
		}
		if once || interval <= 0 {
			_, err := io.WriteString(w, b.String())
			return err
		}
		fmt.Fprintf(w, "\x1b[H\x1b[2J%s  (every %v, Ctrl-C to stop)\n\n%s", time.Now().Format(time.TimeOnly), interval, b.String())
		t := time.NewTimer(interval)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
	}
}
