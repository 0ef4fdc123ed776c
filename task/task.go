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
	"maps"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/blobstore"
	"github.com/registry-proxy/registry-proxy/metrics"
	"github.com/registry-proxy/registry-proxy/p2p/collector"
	"github.com/registry-proxy/registry-proxy/piece"
)

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
	// Verified is when the blob matched its digest, from Started: its
	// readers had their last byte then; Duration adds the commit to disk.
	Verified time.Duration `json:"verified,omitempty"`
	Error    string        `json:"error,omitempty"`
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

	// The pieces' state (which are done, their checksums, whether the
	// blob has matched its digest) is the partial blob's alone; the task
	// adds who reads it and how the download ended.
	mu       sync.Mutex
	wantedAt time.Time // last reader or peer interest (Touch)
	err      error
	finished chan struct{}
	ended    bool // set, with elapsed and err, before finished closes
	elapsed  time.Duration
	verified time.Duration // from started; zero until the digest matched
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
	t.plan = t.m.opts.Pieces.For(size)
	p, err := t.m.opts.Store.Ingest(ctx, t.req.Digest, t.plan)
	if err != nil {
		return fmt.Errorf("task: %w", err)
	}
	t.partial = p
	return nil
}

// Digest implements collector.Job.
func (t *Task) Digest() digest.Digest { return t.req.Digest }

// Plan implements collector.Job.
func (t *Task) Plan() piece.Plan { return t.plan }

// Size is the blob size.
func (t *Task) Size() int64 { return t.plan.Size }

// Has implements collector.Job.
func (t *Task) Has(i int) bool { return t.partial.Has(i) }

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
	t.sources[source] += n
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
		if i < t.plan.Count() && (next < 0 || i < next) && !t.partial.Has(i) {
			next = i
		}
	}
	return next
}

// Changed returns a channel closed at the download's next change: a piece
// done, the pieces thrown away, the blob verified, committed or given up
// (the partial blob closed, after which it is closed at once).
func (t *Task) Changed() <-chan struct{} { return t.partial.Changed() }

// Pieces returns which pieces are done, with their checksums.
func (t *Task) Pieces() (done []bool, crc []uint32) { return t.partial.Pieces() }

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
	st.Verified = t.verified
	if t.ended {
		st.Duration = t.elapsed
		st.State = "complete"
		if t.err != nil {
			st.State, st.Error = "failed", t.err.Error()
		}
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
	t.sources = map[string]int64{}
	return nil
}

// verify hashes the blob in order as its pieces land and commits it on a match.
func (t *Task) verify(ctx context.Context, fillDone chan error) error {
	h := t.req.Digest.Algorithm().Hash()
	bp := make([]byte, 1<<20)
	for i := 0; i < t.plan.Count(); i++ {
		off, n := t.plan.Range(i)
		for {
			st := t.partial.StateAt(off)
			if st.End > off {
				break
			}
			select {
			case <-st.Changed:
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
		if _, err := io.CopyBuffer(h, io.NewSectionReader(t.partial, off, n), bp); err != nil {
			return fmt.Errorf("task: hash piece %d: %w", i, err)
		}
	}
	got := digest.NewDigest(t.req.Digest.Algorithm(), h)
	if got != t.req.Digest {
		return fmt.Errorf("%w: %s hashed to %s", ErrDigestMismatch, t.req.Digest, got)
	}
	t.mu.Lock()
	t.verified = time.Since(t.started)
	t.mu.Unlock()
	// Commit seals the partial blob first: readers may finish while it
	// syncs the bytes to disk.
	return t.partial.Commit(got)
}

func (t *Task) finish(err error) {
	// The error first: a reader opening as the partial blob is discarded
	// finds the file gone and returns this error (NewReader).
	t.mu.Lock()
	t.err = err
	t.elapsed = time.Since(t.started)
	t.ended = true
	t.mu.Unlock()
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
	// Recorded among the recent, then unlisted, before Done closes: whoever
	// waited on it finds it gone and its accounting kept.
	st := t.Stats()
	t.m.recent.Add(t.req.Digest, st)
	t.m.remove(t)
	close(t.finished)

	attrs := []any{"digest", t.req.Digest, "repo", t.req.Repo, "registry", t.req.Registry, "size", t.plan.Size, "duration", st.Duration.Round(time.Millisecond)}
	for _, k := range slices.Sorted(maps.Keys(st.Sources)) {
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

// Wait blocks until the task finishes and returns its error.
func (t *Task) Wait(ctx context.Context) error {
	select {
	case <-t.finished:
		return t.Err()
	case <-ctx.Done():
		return ctx.Err()
	}
}
