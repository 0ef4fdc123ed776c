package preheat

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"time"

	"github.com/containerd/platforms"
	"github.com/opencontainers/go-digest"
	"github.com/registry-proxy/registry-proxy/proxy/upstream"
)

// Request is the body of POST /preheat.
type Request struct {
	Images []string `json:"images"`
	// Nodes is how many nodes get the blobs, this one first; 0: all.
	Nodes int `json:"nodes"`
	// Platform is os/arch[/variant]; empty: this node's.
	Platform string `json:"platform"`
}

// Event is one line of POST /preheat's answer (NDJSON): a plan, progress
// and a result per node and blob, and done.
type Event struct {
	Type string `json:"type"` // plan, progress, result, done
	// plan
	Nodes []string `json:"nodes,omitempty"`
	Blobs []Blob   `json:"blobs,omitempty"`
	// progress and result
	Node   string `json:"node,omitempty"`
	Digest string `json:"digest,omitempty"`
	Done   int64  `json:"done,omitempty"`
	Size   int64  `json:"size,omitempty"`
	Error  string `json:"error,omitempty"`
	// result and done: seconds since the preheat started
	Elapsed float64 `json:"elapsed,omitempty"`
	// done: results that failed
	Failed int `json:"failed,omitempty"`
}

// Node is a member that fetches a blob when asked.
type Node interface {
	ID() string
	// Fetch has the node fetch a blob with its own credentials; report
	// gets its progress until it is complete (done == size) or fails.
	Fetch(ctx context.Context, registry, repo string, d digest.Digest, report func(done, size int64)) error
}

// Cluster lists the live nodes, this one first.
type Cluster interface {
	Nodes() []Node
}

// Preheater runs preheats.
type Preheater struct {
	Manifests Manifests
	Cluster   Cluster
	// Parallel bounds the (node, blob) fetches followed at once.
	Parallel int
	Logger   *slog.Logger
}

// Plan resolves a request to the nodes and blobs (each blob once).
func (p *Preheater) Plan(ctx context.Context, req Request) ([]Node, []Blob, error) {
	if len(req.Images) == 0 {
		return nil, nil, fmt.Errorf("%w: no image named", ErrResolve)
	}
	if req.Platform == "" {
		req.Platform = platforms.DefaultString()
	}
	var blobs []Blob
	seen := map[string]bool{}
	for _, img := range req.Images {
		bs, err := Resolve(ctx, p.Manifests, img, req.Platform)
		if err != nil {
			return nil, nil, err
		}
		for _, b := range bs {
			if !seen[b.Digest] {
				seen[b.Digest] = true
				blobs = append(blobs, b)
			}
		}
	}
	nodes := p.Cluster.Nodes()
	if req.Nodes > 0 && req.Nodes < len(nodes) {
		nodes = nodes[:req.Nodes]
	}
	return nodes, blobs, nil
}

// Run has every node fetch every blob, all at once, and emits the events;
// emit is called from one goroutine at a time. It returns the number of
// (node, blob) fetches that failed.
func (p *Preheater) Run(ctx context.Context, nodes []Node, blobs []Blob, emit func(Event)) int {
	start := time.Now()
	log := p.logger()
	ids := make([]string, len(nodes))
	for i, n := range nodes {
		ids[i] = n.ID()
	}
	var mu sync.Mutex
	send := func(e Event) {
		mu.Lock()
		defer mu.Unlock()
		emit(e)
	}
	send(Event{Type: "plan", Nodes: ids, Blobs: blobs})
	log.Info("preheat started", "nodes", len(nodes), "blobs", len(blobs))
	parallel := p.Parallel
	if parallel <= 0 {
		parallel = 256
	}
	sem := make(chan struct{}, parallel)
	var wg sync.WaitGroup
	succeeded := 0
	for _, b := range blobs {
		d := digest.Digest(b.Digest)
		for _, n := range nodes {
			wg.Add(1)
			go func() {
				defer wg.Done()
				select {
				case sem <- struct{}{}:
				case <-ctx.Done():
					return
				}
				defer func() { <-sem }()
				err := n.Fetch(ctx, b.Registry, b.Repo, d, func(done, size int64) {
					send(Event{Type: "progress", Node: n.ID(), Digest: b.Digest, Done: done, Size: size})
				})
				e := Event{Type: "result", Node: n.ID(), Digest: b.Digest, Size: b.Size, Done: b.Size, Elapsed: time.Since(start).Seconds()}
				if err == nil {
					mu.Lock()
					succeeded++
					mu.Unlock()
				} else {
					e.Done, e.Error = 0, err.Error()
					log.Warn("preheat of a blob failed", "node", n.ID(), "digest", b.Digest, "image", b.Image, "err", err)
				}
				send(e)
			}()
		}
	}
	wg.Wait()
	// Fetches never started (ctx ended) are failures too.
	failed := len(nodes)*len(blobs) - succeeded
	elapsed := time.Since(start)
	send(Event{Type: "done", Failed: failed, Elapsed: elapsed.Seconds()})
	log.Info("preheat done", "nodes", len(nodes), "blobs", len(blobs), "failed", failed, "took", elapsed.Round(time.Millisecond))
	return failed
}

func (p *Preheater) logger() *slog.Logger {
	if p.Logger == nil {
		return slog.Default()
	}
	return p.Logger.With("component", "preheat")
}

// ServeHTTP serves POST /preheat: a Request as JSON; the answer is 400 when
// an image cannot be resolved, else 200 and the events as NDJSON, flushed
// as they come, ending with done.
func (p *Preheater) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		http.Error(w, "POST a preheat request", http.StatusMethodNotAllowed)
		return
	}
	var req Request
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20)).Decode(&req); err != nil {
		http.Error(w, "preheat request: "+err.Error(), http.StatusBadRequest)
		return
	}
	nodes, blobs, err := p.Plan(r.Context(), req)
	if err != nil {
		status := http.StatusBadGateway
		var se *upstream.StatusError
		switch {
		case errors.Is(err, ErrResolve):
			status = http.StatusBadRequest
		case errors.As(err, &se) && se.Code >= 400 && se.Code < 500:
			status = se.Code // not found, or refused to this node's credentials
		}
		p.logger().Warn("preheat refused", "images", req.Images, "err", err)
		http.Error(w, err.Error(), status)
		return
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	enc := json.NewEncoder(w)
	p.Run(r.Context(), nodes, blobs, func(e Event) {
		enc.Encode(e)
		rc.Flush()
	})
}
