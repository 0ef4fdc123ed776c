// Package task turns requests for a blob into one download per digest per node,
// however many clients ask: the blob's pieces are collected into a partial
// file, readers stream the verified-so-far prefix as it grows, and the blob is
// committed only when its digest matches.
package task

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"slices"
	"sort"
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
	// the idle grace period; its pieces stay to resume.
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
	// UpstreamOnly fetches from the upstream alone: set for the second try
	// of a blob whose first try, with pieces from peers, failed its digest.
	UpstreamOnly bool
}

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
}

// Fill implements Filler.
func (f UpstreamFiller) Fill(ctx context.Context, job collector.Job, req Request) error {
	return f.Collector.Collect(ctx, job, collector.NewUpstreamParent(f.Upstream, req.Registry, req.Repo, req.Digest, req.Header))
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
		changed:  make(chan struct{}),
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
	m.log.Debug("blob download started", "digest", req.Digest, "size", t.plan.Size, "registry", req.Registry, "repo", req.Repo, "for_peers", req.ForPeers)
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

// Stats is where a blob's bytes came from.
type Stats struct {
	Digest   digest.Digest    `json:"digest"`
	Registry string           `json:"registry,omitempty"`
	Repo     string           `json:"repo,omitempty"`
	Size     int64            `json:"size"`
	State    string           `json:"state"` // downloading, complete, failed
	Sources  map[string]int64 `json:"sources"`
	Started  time.Time        `json:"started"`
	Duration time.Duration    `json:"duration"`
	Error    string           `json:"error,omitempty"`
}

// Task is the download of one blob.
type Task struct {
	m       *Manager
	req     Request
	ready   chan struct{} // closed once open has finished
	openErr error
	// ctx is the download's; stop ends it with a cause (ErrUnwanted).
	ctx     context.Context
	stop    context.CancelCauseFunc
	plan    piece.Plan
	partial *blobstore.Partial
	started time.Time

	mu       sync.Mutex
	changed  chan struct{} // closed and replaced on every change
	done     []bool
	verified bool
	wantedAt time.Time // last reader or peer interest (Touch)
	err      error
	finished chan struct{}
	elapsed  time.Duration
	gen      int // bumped when the pieces are thrown away
	readers  map[*Reader]struct{}
	sources  map[string]int64
}

func (t *Task) open() error {
	ctx, cancel := context.WithTimeout(t.ctx, t.m.opts.OpenTimeout)
	defer cancel()
	size, err := t.m.opts.Sizer.BlobSize(ctx, t.req)
	if err != nil {
		return err
	}
	if max := t.m.opts.MaxBlobSize; max > 0 && size > max {
		return fmt.Errorf("%w: %s is %d bytes, limit %d", ErrTooLarge, t.req.Digest, size, max)
	}
	t.plan = piece.PlanFor(size)
	p, err := t.m.opts.Store.Ingest(ctx, t.req.Digest, t.plan)
	if err != nil {
		return fmt.Errorf("task: %w", err)
	}
	t.partial = p
	t.done = p.Bitmap()
	return nil
}

// Digest implements collector.Job.
func (t *Task) Digest() digest.Digest { return t.req.Digest }

// Plan implements collector.Job.
func (t *Task) Plan() piece.Plan { return t.plan }

// Size is the blob size.
func (t *Task) Size() int64 { return t.plan.Size }

// Has implements collector.Job.
func (t *Task) Has(i int) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.done[i]
}

// Put implements collector.Job.
func (t *Task) Put(i int, r io.Reader, source string, want collector.Expect) error {
	crc, err := t.partial.WritePiece(i, r)
	if err != nil {
		return err
	}
	if want.Known && crc != want.CRC {
		return fmt.Errorf("%w: piece %d from %s: got %08x, announced %08x", collector.ErrChecksum, i, source, crc, want.CRC)
	}
	fresh, err := t.partial.MarkDone(i, crc)
	if err != nil || !fresh {
		return err
	}
	_, n := t.plan.Range(i)
	t.mu.Lock()
	t.done[i] = true
	t.sources[source] += n
	t.broadcastLocked()
	t.mu.Unlock()
	kind := metrics.SourcePeer
	if source == collector.UpstreamID {
		kind = metrics.SourceUpstream
	}
	t.m.opts.Metrics.BlobBytes(kind, n)
	return nil
}

// Next implements collector.Job: the lowest missing piece a reader is at.
func (t *Task) Next() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	next := -1
	for r := range t.readers {
		i := t.plan.Index(r.off)
		if i < len(t.done) && !t.done[i] && (next < 0 || i < next) {
			next = i
		}
	}
	return next
}

func (t *Task) broadcastLocked() {
	close(t.changed)
	t.changed = make(chan struct{})
}

// Changed returns a channel closed at the task's next change (a piece
// done, the task finished).
func (t *Task) Changed() <-chan struct{} {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.changed
}

// Pieces returns which pieces are done, with their checksums.
func (t *Task) Pieces() (done []bool, crc []uint32) {
	t.mu.Lock()
	done = append([]bool(nil), t.done...)
	t.mu.Unlock()
	// A piece is marked in the partial blob before the task, so every done
	// piece here has its checksum there.
	return done, t.partial.Checksums()
}

// OpenFile opens the blob's bytes (partial or committed) for reading pieces
// that are done.
func (t *Task) OpenFile() (*os.File, error) { return t.partial.OpenData() }

// Done is closed when the task has finished; Err then says how.
func (t *Task) Done() <-chan struct{} { return t.finished }

// Err is nil while running and after success.
func (t *Task) Err() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.err
}

// Stats returns the task's accounting so far.
func (t *Task) Stats() Stats {
	t.mu.Lock()
	defer t.mu.Unlock()
	st := Stats{Digest: t.req.Digest, Size: t.plan.Size, State: "downloading", Sources: map[string]int64{}, Started: t.started, Duration: time.Since(t.started)}
	for k, v := range t.sources {
		st.Sources[k] = v
	}
	select {
	case <-t.finished:
		st.Duration = t.elapsed
		st.State = "complete"
		if t.err != nil {
			st.State, st.Error = "failed", t.err.Error()
		}
	default:
	}
	return st
}

func (t *Task) run() {
	defer t.m.wg.Done()
	defer t.stop(nil)
	err := t.collect()
	if errors.Is(err, ErrDigestMismatch) && !t.req.UpstreamOnly && t.peerBytes() {
		// Peers are not trusted: drop every piece and take the blob from
		// the upstream alone.
		t.m.log.Error("blob with pieces from peers failed its digest; fetching it again from the upstream alone",
			"digest", t.req.Digest, "sources", t.Stats().Sources, "err", err)
		if err = t.restart(); err == nil {
			t.req.UpstreamOnly = true
			err = t.collect()
		}
	}
	t.finish(err)
}

// Touch records that a peer wants the blob now (it watches or fetches its
// pieces), which keeps an unread download from being stopped as idle.
func (t *Task) Touch() {
	now := t.m.opts.Now()
	t.mu.Lock()
	t.wantedAt = now
	t.mu.Unlock()
}

// collect runs the collector and the verifier until the blob is verified.
func (t *Task) collect() error {
	ctx, cancel := context.WithCancelCause(t.ctx)
	fillDone := make(chan error, 1)
	go func() { fillDone <- t.m.opts.Filler.Fill(ctx, t, t.req) }()
	err := t.verify(ctx, fillDone)
	if errors.Is(context.Cause(ctx), ErrUnwanted) {
		err = ErrUnwanted
	}
	cancel(nil)
	if ferr := <-fillDone; err == nil && ferr != nil && !errors.Is(ferr, context.Canceled) {
		err = ferr
	}
	return err
}

func (t *Task) peerBytes() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	for src := range t.sources {
		if src != collector.UpstreamID {
			return true
		}
	}
	return false
}

// restart forgets every piece; readers attached so far fail, as the bytes
// they were sent may not be the blob's.
func (t *Task) restart() error {
	if err := t.partial.Reset(); err != nil {
		return err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	for i := range t.done {
		t.done[i] = false
	}
	t.sources = map[string]int64{}
	t.gen++
	t.broadcastLocked()
	return nil
}

// verify hashes the blob in order as its pieces land and commits it on a match.
func (t *Task) verify(ctx context.Context, fillDone chan error) error {
	h := t.req.Digest.Algorithm().Hash()
	bp := make([]byte, 1<<20)
	for i := 0; i < t.plan.Count(); i++ {
		for {
			t.mu.Lock()
			ok, ch := t.done[i], t.changed
			t.mu.Unlock()
			if ok {
				break
			}
			select {
			case <-ch:
			case err := <-fillDone:
				fillDone <- err // run reads it again
				if err != nil {
					return err
				}
				if !t.Has(i) {
					return fmt.Errorf("task: collector finished without piece %d", i)
				}
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		off, n := t.plan.Range(i)
		if _, err := io.CopyBuffer(h, io.NewSectionReader(t.partial, off, n), bp); err != nil {
			return fmt.Errorf("task: hash piece %d: %w", i, err)
		}
	}
	got := digest.NewDigest(t.req.Digest.Algorithm(), h)
	if got != t.req.Digest {
		return fmt.Errorf("%w: %s hashed to %s", ErrDigestMismatch, t.req.Digest, got)
	}
	// The bytes are verified: readers may finish while the commit syncs
	// them to disk.
	t.mu.Lock()
	t.verified = true
	t.broadcastLocked()
	t.mu.Unlock()
	return t.partial.Commit(got)
}

func (t *Task) finish(err error) {
	switch {
	case err == nil:
		t.partial.Close()
	case errors.Is(err, ErrDigestMismatch):
		if derr := t.partial.Discard(); derr != nil {
			t.m.log.Warn("discarding mismatched blob", "digest", t.req.Digest, "err", derr)
		}
	default:
		t.partial.Close() // pieces stay to resume
	}
	t.mu.Lock()
	t.err = err
	t.elapsed = time.Since(t.started)
	close(t.finished)
	t.broadcastLocked()
	t.mu.Unlock()
	t.m.remove(t)
	st := t.Stats()
	t.m.recent.Add(t.req.Digest, st)

	attrs := []any{"digest", t.req.Digest, "repo", t.req.Repo, "registry", t.req.Registry, "size", t.plan.Size, "duration", st.Duration.Round(time.Millisecond)}
	for _, k := range sortedKeys(st.Sources) {
		attrs = append(attrs, "from_"+k, st.Sources[k])
	}
	switch {
	case err == nil:
		t.m.log.Info("blob complete", attrs...)
		t.m.opts.Metrics.Blob("complete", st.Duration)
	case errors.Is(err, context.Canceled), errors.Is(err, ErrUnwanted):
		t.m.log.Info("blob download stopped", append(attrs, "why", err)...)
		t.m.opts.Metrics.Blob("stopped", st.Duration)
	default:
		t.m.log.Error("blob download failed", append(attrs, "err", err)...)
		t.m.opts.Metrics.Blob("failed", st.Duration)
	}
}

func sortedKeys(m map[string]int64) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// available is how many bytes from off can be read now: the run of done
// pieces from off, less the blob's last byte until the digest has matched,
// so no reader ever receives a whole blob that is not verified.
func (t *Task) availableLocked(off, hold int64) int64 {
	if off >= t.plan.Size {
		return 0
	}
	j := t.plan.Index(off)
	for j < len(t.done) && t.done[j] {
		j++
	}
	end, _ := t.plan.Range(j)
	if j >= len(t.done) {
		end = t.plan.Size
	}
	if !t.verified && end >= t.plan.Size {
		end = t.plan.Size - 1
	}
	if !t.verified && hold > 0 && end >= hold {
		end = hold - 1
	}
	return max(end-off, 0)
}

// Reader reads the blob as it arrives. It is an io.ReadSeeker, so
// http.ServeContent can serve it with ranges.
type Reader struct {
	t    *Task
	ctx  context.Context
	f    *os.File
	off  int64
	gen  int
	hold int64 // see HoldUntilVerified
}

// HoldUntilVerified makes the reader keep back the byte before end until the
// whole blob has matched its digest, as it always keeps back the blob's last
// byte: a response for a range ending at end is never completed with bytes
// that may turn out not to be the blob's.
func (r *Reader) HoldUntilVerified(end int64) {
	r.t.mu.Lock()
	r.hold = end
	r.t.mu.Unlock()
}

// NewReader returns a reader of the blob; reads block until the bytes have
// arrived, ctx ends or the task fails. Close it when done.
func (t *Task) NewReader(ctx context.Context) (*Reader, error) {
	f, err := t.partial.OpenData()
	if err != nil {
		if e := t.Err(); e != nil {
			return nil, e
		}
		return nil, fmt.Errorf("task: open %s: %w", t.req.Digest, err)
	}
	r := &Reader{t: t, ctx: ctx, f: f}
	now := t.m.opts.Now()
	t.mu.Lock()
	r.gen = t.gen
	t.readers[r] = struct{}{}
	t.wantedAt = now
	t.mu.Unlock()
	return r, nil
}

// available blocks until bytes at the reader's offset can be read and says
// how many; io.EOF at the end of a verified blob.
func (r *Reader) available() (int64, error) {
	t := r.t
	for {
		t.mu.Lock()
		n, verified, err, ch := t.availableLocked(r.off, r.hold), t.verified, t.err, t.changed
		stale := r.gen != t.gen
		t.mu.Unlock()
		switch {
		case stale:
			return 0, ErrDigestMismatch
		case n > 0:
			return n, nil
		case verified && r.off >= t.plan.Size:
			return 0, io.EOF
		case err != nil:
			return 0, err
		}
		select {
		case <-ch:
		case <-r.ctx.Done():
			return 0, r.ctx.Err()
		}
	}
}

// advance moves the offset, which Next reads under the task's lock.
func (r *Reader) advance(n int64) {
	r.t.mu.Lock()
	r.off += n
	r.t.mu.Unlock()
}

// Read implements io.Reader.
func (r *Reader) Read(p []byte) (int, error) {
	n, err := r.available()
	if err != nil {
		return 0, err
	}
	if int64(len(p)) > n {
		p = p[:n]
	}
	m, err := r.f.ReadAt(p, r.off)
	r.advance(int64(m))
	if err == io.EOF && m > 0 {
		err = nil
	}
	return m, err
}

// WriteTo copies the rest of the blob to w as it arrives. Each run of
// available bytes goes out with one copy from the file, which the kernel does
// with sendfile when w is a TCP connection (an http.ResponseWriter is).
func (r *Reader) WriteTo(w io.Writer) (int64, error) {
	var total int64
	for {
		n, err := r.available()
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
		if _, err := r.f.Seek(r.off, io.SeekStart); err != nil {
			return total, err
		}
		m, err := io.Copy(w, &io.LimitedReader{R: r.f, N: n})
		total += m
		r.advance(m)
		if err != nil {
			return total, err
		}
		if m < n {
			return total, io.ErrUnexpectedEOF
		}
	}
}

// Seek implements io.Seeker.
func (r *Reader) Seek(offset int64, whence int) (int64, error) {
	switch whence {
	case io.SeekStart:
	case io.SeekCurrent:
		offset += r.off
	case io.SeekEnd:
		offset += r.t.plan.Size
	default:
		return 0, fmt.Errorf("task: bad whence %d", whence)
	}
	if offset < 0 {
		return 0, fmt.Errorf("task: negative offset")
	}
	r.t.mu.Lock()
	r.off = offset
	r.t.mu.Unlock()
	return offset, nil
}

// Wait blocks until the task finishes and returns its error.
func (t *Task) Wait(ctx context.Context) error {
	select {
	case <-t.finished:
		return t.Err()
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Close releases the reader.
func (r *Reader) Close() error {
	now := r.t.m.opts.Now()
	r.t.mu.Lock()
	delete(r.t.readers, r)
	r.t.wantedAt = now // the grace period starts when the last reader leaves
	r.t.mu.Unlock()
	return r.f.Close()
}
