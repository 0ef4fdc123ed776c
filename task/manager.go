package task

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"sync"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/blobstore"
	"github.com/registry-proxy/registry-proxy/metrics"
	"github.com/registry-proxy/registry-proxy/p2p/collector"
	"github.com/registry-proxy/registry-proxy/piece"
)

var (
	// ErrComplete means the blob is complete in the store: read it there.
	ErrComplete = errors.New("task: blob already complete")
	// ErrDigestMismatch means the collected bytes do not hash to the digest.
	ErrDigestMismatch = errors.New("task: blob does not match its digest")
	// ErrTooLarge means the blob is larger than the configured limit.
	ErrTooLarge = errors.New("task: blob too large")
	// ErrTooMany means the node runs as many downloads as it may.
	ErrTooMany = errors.New("task: too many downloads at once")
	// ErrDraining means the node is shutting down and starts no download.
	ErrDraining = errors.New("task: shutting down")
	// ErrUnwanted stops a download that no reader and no peer wanted for
	// the idle grace period; its pieces stay to resume, the rest of the
	// space reserved for it is given back (blobstore.Partial.Close).
	ErrUnwanted = errors.New("task: stopped, nobody wants the blob")
)

// Request says which blob to fetch and where from.
type Request struct {
	Digest   digest.Digest
	Registry string
	Repo     string
	// Header carries the client's credentials to the upstream.
	Header http.Header
	// ForPeers marks a fetch on peers' behalf (this node owns the digest):
	// it goes upstream with this node's own credentials, never a client's.
	ForPeers bool
	// NodeCredentials marks a fetch for a client without credentials of a
	// repository in access mode "node": it goes upstream with this node's
	// own credentials, as ForPeers does.
	NodeCredentials bool
	// UpstreamOnly fetches from the upstream alone: set for the second try
	// of a blob whose first try, with pieces from peers, failed its digest.
	UpstreamOnly bool
}

// NodeAuth reports whether the request goes upstream with this node's own
// credentials rather than with Header.
func (r Request) NodeAuth() bool { return r.ForPeers || r.NodeCredentials }

// Sizer learns a blob's size before its download starts (a HEAD upstream).
type Sizer interface {
	BlobSize(ctx context.Context, req Request) (int64, error)
}

// Filler collects the missing pieces of a download: from the upstream alone
// (UpstreamFiller), or across the cluster (the swarm's downloader).
type Filler interface {
	Fill(ctx context.Context, job collector.Job, req Request) error
}

// UpstreamFiller fills a download from the upstream alone: a node without
// peers.
type UpstreamFiller struct {
	Collector *collector.Collector
	Upstream  collector.BlobSource
	// NodeUpstream fetches with this node's own credentials, for requests
	// whose NodeAuth is set; nil: Upstream.
	NodeUpstream collector.BlobSource
}

// Fill implements Filler.
func (f UpstreamFiller) Fill(ctx context.Context, job collector.Job, req Request) error {
	src := f.Upstream
	if req.NodeAuth() && f.NodeUpstream != nil {
		src = f.NodeUpstream
	}
	return f.Collector.Collect(ctx, job, f.Collector.NewUpstreamParent(src, req.Registry, req.Repo, req.Digest, req.Header))
}

// UpstreamSizer asks the upstream with the request's own headers.
type UpstreamSizer struct{ Upstream BlobSizer }

// BlobSizer is the upstream's HEAD of a blob; *upstream.Client is one.
type BlobSizer interface {
	BlobSize(ctx context.Context, registry, repo string, d digest.Digest, hdr http.Header) (int64, error)
}

// BlobSize implements Sizer.
func (s UpstreamSizer) BlobSize(ctx context.Context, req Request) (int64, error) {
	return s.Upstream.BlobSize(ctx, req.Registry, req.Repo, req.Digest, req.Header)
}

// Options configure a Manager.
type Options struct {
	Store  *blobstore.Store
	Sizer  Sizer
	Filler Filler
	// OpenTimeout bounds learning the size of a new blob.
	OpenTimeout time.Duration
	// MaxBlobSize refuses larger blobs; zero means no limit.
	MaxBlobSize int64
	// MaxTasks bounds the downloads at once, and MaxPerRegistry those for
	// one registry; zero means no limit.
	MaxTasks, MaxPerRegistry int
	// IdleStop stops a download that has had no reader and no peer asking
	// for it (Touch) for this long; zero never stops one.
	IdleStop time.Duration
	// Pieces cuts blobs into pieces (the cluster's smallest piece).
	Pieces piece.Planner
	// Now is the clock; time.Now when nil.
	Now    func() time.Time
	Logger *slog.Logger
	// Metrics counts bytes by source and ended downloads; may be nil.
	Metrics *metrics.Metrics
}

// Manager runs at most one task per digest.
type Manager struct {
	opts   Options
	log    *slog.Logger
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu       sync.Mutex
	draining bool
	tasks    map[digest.Digest]*Task
	recent   *lru.Cache[digest.Digest, Stats]
}

// NewManager returns a manager; Close stops its tasks.
func NewManager(opts Options) *Manager {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.OpenTimeout <= 0 {
		opts.OpenTimeout = time.Minute
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	ctx, cancel := context.WithCancel(context.Background())
	recent, _ := lru.New[digest.Digest, Stats](1024)
	m := &Manager{
		opts:   opts,
		log:    opts.Logger.With("component", "task"),
		ctx:    ctx,
		cancel: cancel,
		tasks:  map[digest.Digest]*Task{},
		recent: recent,
	}
	if opts.IdleStop > 0 {
		m.wg.Go(func() {
			t := time.NewTicker(max(opts.IdleStop/4, time.Second))
			defer t.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-t.C:
					m.StopIdle()
				}
			}
		})
	}
	return m
}

// StopIdle stops every download that no reader and no peer has wanted for
// IdleStop, and says how many it stopped.
func (m *Manager) StopIdle() int {
	if m.opts.IdleStop <= 0 {
		return 0
	}
	now := m.opts.Now()
	m.mu.Lock()
	tasks := make([]*Task, 0, len(m.tasks))
	for _, t := range m.tasks {
		tasks = append(tasks, t)
	}
	m.mu.Unlock()
	n := 0
	for _, t := range tasks {
		t.mu.Lock()
		idle := len(t.readers) == 0 && now.Sub(t.wantedAt) > m.opts.IdleStop
		t.mu.Unlock()
		if idle {
			m.log.Info("stopping a download nobody wants", "digest", t.req.Digest, "idle", m.opts.IdleStop)
			t.stop(ErrUnwanted)
			n++
		}
	}
	return n
}

// Close cancels every task and waits for them. Partial blobs stay on disk to
// resume after a restart.
func (m *Manager) Close() {
	m.cancel()
	m.wg.Wait()
}

// Lookup returns the running task for d.
func (m *Manager) Lookup(d digest.Digest) (*Task, bool) {
	m.mu.Lock()
	t, ok := m.tasks[d]
	m.mu.Unlock()
	if !ok {
		return nil, false
	}
	select {
	case <-t.ready:
		return t, t.openErr == nil
	default:
		return nil, false
	}
}

// Open returns the task for req.Digest, starting it if none runs. Concurrent
// callers share one task. It returns ErrComplete when the blob is in the store.
func (m *Manager) Open(ctx context.Context, req Request) (*Task, error) {
	m.mu.Lock()
	if t, ok := m.tasks[req.Digest]; ok {
		m.mu.Unlock()
		select {
		case <-t.ready:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		if t.openErr != nil {
			return nil, t.openErr
		}
		t.Touch()
		return t, nil
	}
	if _, err := m.opts.Store.Stat(req.Digest); err == nil {
		m.mu.Unlock()
		return nil, ErrComplete
	}
	if m.ctx.Err() != nil {
		m.mu.Unlock()
		return nil, fmt.Errorf("task: %w", m.ctx.Err())
	}
	if err := m.admitLocked(req.Registry); err != nil {
		m.mu.Unlock()
		return nil, err
	}
	t := &Task{
		m:        m,
		req:      req,
		ready:    make(chan struct{}),
		finished: make(chan struct{}),
		readers:  map[*Reader]struct{}{},
		sources:  map[string]int64{},
		started:  time.Now(),
		wantedAt: m.opts.Now(),
	}
	// Before the task is visible: StopIdle may stop one still opening.
	t.ctx, t.stop = context.WithCancelCause(m.ctx)
	m.tasks[req.Digest] = t
	m.wg.Add(1) // held until run ends, or open fails
	m.mu.Unlock()

	if err := t.open(); err != nil {
		t.stop(nil)
		t.openErr = err
		m.remove(t)
		close(t.ready)
		m.wg.Done()
		return nil, err
	}
	m.log.Debug("blob download started", "digest", req.Digest, "size", t.plan.Size, "registry", req.Registry, "repo", req.Repo, "for_peers", req.ForPeers, "node_credentials", req.NodeCredentials)
	go t.run()
	close(t.ready)
	return t, nil
}

// admitLocked refuses a new download beyond the caps.
func (m *Manager) admitLocked(registry string) error {
	if m.draining {
		return ErrDraining
	}
	if m.opts.MaxTasks > 0 && len(m.tasks) >= m.opts.MaxTasks {
		return fmt.Errorf("%w: %d running", ErrTooMany, len(m.tasks))
	}
	if m.opts.MaxPerRegistry > 0 {
		n := 0
		for _, t := range m.tasks {
			if t.req.Registry == registry {
				n++
			}
		}
		if n >= m.opts.MaxPerRegistry {
			return fmt.Errorf("%w: %d running for %s", ErrTooMany, n, registry)
		}
	}
	return nil
}

func (m *Manager) remove(t *Task) {
	m.mu.Lock()
	if m.tasks[t.req.Digest] == t {
		delete(m.tasks, t.req.Digest)
	}
	m.mu.Unlock()
}

// Drain refuses new downloads (ErrDraining) from now on; running ones go on.
func (m *Manager) Drain() {
	m.mu.Lock()
	m.draining = true
	m.mu.Unlock()
}

// Len is the number of running tasks.
func (m *Manager) Len() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.tasks)
}

// Running returns the accounting of every running task, oldest first.
func (m *Manager) Running() []Stats {
	m.mu.Lock()
	tasks := make([]*Task, 0, len(m.tasks))
	for _, t := range m.tasks {
		tasks = append(tasks, t)
	}
	m.mu.Unlock()
	out := make([]Stats, 0, len(tasks))
	for _, t := range tasks {
		st := t.Stats()
		st.Registry, st.Repo = t.req.Registry, t.req.Repo
		out = append(out, st)
	}
	slices.SortFunc(out, func(a, b Stats) int { return a.Started.Compare(b.Started) })
	return out
}

// Stats returns the accounting of the running or a recent task for d.
func (m *Manager) Stats(d digest.Digest) (Stats, bool) {
	if t, ok := m.Lookup(d); ok {
		return t.Stats(), true
	}
	return m.recent.Get(d)
}

// Fetch has this node fetch a blob (or join its download) and reports its
// progress, bytes of verified pieces, at least every 250 ms until it is
// complete and verified here (done == size, reported last) or fails.
func (m *Manager) Fetch(ctx context.Context, req Request, report func(done, size int64) error) error {
	for {
		if size, err := m.opts.Store.Stat(req.Digest); err == nil {
			return report(size, size)
		}
		t, err := m.Open(ctx, req)
		if errors.Is(err, ErrComplete) {
			continue
		}
		if err != nil {
			return err
		}
		if err := t.follow(ctx, report); err != nil {
			return err
		}
	}
}

// follow reports a download's progress until it ends; it keeps the task
// wanted meanwhile, with no reader.
func (t *Task) follow(ctx context.Context, report func(done, size int64) error) error {
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		t.Touch()
		var done int64
		have, _ := t.Pieces()
		for i, ok := range have {
			if ok {
				_, n := t.plan.Range(i)
				done += n
			}
		}
		if done < t.Size() {
			if err := report(done, t.Size()); err != nil {
				return err
			}
		}
		select {
		case <-t.Done():
			if err := t.Err(); err != nil {
				return fmt.Errorf("task: fetching %s: %w", t.Digest(), err)
			}
			return nil
		case <-tick.C:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}
