package task

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/blobstore"
	"github.com/registry-proxy/registry-proxy/internal/fakeclock"
	"github.com/registry-proxy/registry-proxy/p2p/collector"
	"github.com/registry-proxy/registry-proxy/piece"
)

// fakeSource serves ranges of one blob, counting the pieces it sends.
type fakeSource struct {
	data    []byte
	corrupt bool          // flip a byte of every range
	gate    chan struct{} // when set, each range waits for a token
	whole   bool          // ignore Range, send everything
	ranges  atomic.Int64
	bytes   atomic.Int64

	mu    sync.Mutex
	calls []int64 // offsets asked for, in order of asking
}

func (f *fakeSource) Blob(ctx context.Context, _, _ string, _ digest.Digest, off, n int64, _ http.Header) (io.ReadCloser, bool, error) {
	f.mu.Lock()
	f.calls = append(f.calls, off)
	f.mu.Unlock()
	if f.gate != nil {
		select {
		case <-f.gate:
		case <-ctx.Done():
			return nil, false, ctx.Err()
		}
	}
	f.ranges.Add(1)
	if f.whole {
		f.bytes.Add(int64(len(f.data)))
		return io.NopCloser(bytes.NewReader(f.data)), true, nil
	}
	b := append([]byte(nil), f.data[off:off+n]...)
	if f.corrupt && len(b) > 0 {
		b[0] ^= 0xff
	}
	f.bytes.Add(n)
	return io.NopCloser(bytes.NewReader(b)), false, nil
}

func newManager(t *testing.T, src *fakeSource, mut ...func(*Options)) (*Manager, *blobstore.Store) {
	t.Helper()
	st, err := blobstore.Open(context.Background(), t.TempDir(), blobstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	opts := Options{
		Store:  st,
		Sizer:  fixedSize(len(src.data)),
		Filler: UpstreamFiller{Collector: collector.New(collector.Options{Concurrency: 4, Attempts: 2}), Upstream: src},
	}
	for _, f := range mut {
		f(&opts)
	}
	m := NewManager(opts)
	t.Cleanup(m.Close)
	return m, st
}

// fixedSize is every blob's size.
type fixedSize int64

func (s fixedSize) BlobSize(context.Context, Request) (int64, error) { return int64(s), nil }

// blockingSize says it was asked by closing asked, then waits for the end.
type blockingSize struct{ asked chan struct{} }

func (s blockingSize) BlobSize(ctx context.Context, _ Request) (int64, error) {
	close(s.asked)
	<-ctx.Done()
	return 0, ctx.Err()
}

// fillFunc is a Filler written in place.
type fillFunc func(ctx context.Context, job collector.Job, req Request) error

func (f fillFunc) Fill(ctx context.Context, job collector.Job, req Request) error {
	return f(ctx, job, req)
}

func blob(t *testing.T, n int) ([]byte, digest.Digest) {
	b := make([]byte, n)
	rand.Read(b)
	return b, digest.FromBytes(b)
}

func TestConcurrentReadersShareOneDownload(t *testing.T) {
	data, d := blob(t, int(piece.MinSize)*3+7)
	src := &fakeSource{data: data}
	m, st := newManager(t, src)
	ctx := context.Background()

	const clients = 50
	var wg sync.WaitGroup
	var shared atomic.Pointer[Task]
	errs := make(chan error, clients)
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tk, err := m.Open(ctx, Request{Digest: d})
			if err == nil {
				shared.Store(tk)
			}
			if errors.Is(err, ErrComplete) {
				b, err := st.Get(context.Background(), d)
				if err != nil {
					errs <- err
					return
				}
				defer b.Close()
				v := d.Verifier()
				io.Copy(v, b)
				if !v.Verified() {
					errs <- errors.New("stored blob differs")
				}
				return
			}
			if err != nil {
				errs <- err
				return
			}
			r, err := tk.NewReader(ctx)
			if err != nil {
				errs <- err
				return
			}
			defer r.Close()
			v := d.Verifier()
			n, err := io.CopyBuffer(v, r, make([]byte, 1<<20))
			if err != nil {
				errs <- err
				return
			}
			if n != int64(len(data)) || !v.Verified() {
				errs <- errors.New("streamed blob differs")
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if got, want := src.ranges.Load(), int64(piece.PlanFor(int64(len(data))).Count()); got != want {
		t.Errorf("upstream served %d ranges, want exactly %d", got, want)
	}
	// Readers finish once the bytes are verified, while the commit syncs
	// them to disk: the blob is in the store when the task is done.
	tk := shared.Load()
	if tk == nil {
		t.Fatal("no client shared the download")
	}
	<-tk.Done()
	if err := tk.Err(); err != nil {
		t.Fatalf("task: %v", err)
	}
	if _, err := st.Stat(d); err != nil {
		t.Errorf("blob not committed: %v", err)
	}
	// Verified (readers' last byte) comes before the commit ends the task.
	if s := tk.Stats(); s.State != "complete" || s.Verified <= 0 || s.Verified > s.Duration {
		t.Errorf("stats %+v: want complete, verified within the duration", s)
	}
}

func TestMismatchIsNeverServedOrStored(t *testing.T) {
	tests := []struct {
		name string
		src  func(data []byte) *fakeSource
	}{
		{"corrupt ranges", func(data []byte) *fakeSource { return &fakeSource{data: data, corrupt: true} }},
		{"whole blob of other bytes", func(data []byte) *fakeSource {
			other := append([]byte(nil), data...)
			other[len(other)-1] ^= 1
			return &fakeSource{data: other, whole: true}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			data, d := blob(t, int(piece.MinSize)+100)
			m, st := newManager(t, tt.src(data))
			tk, err := m.Open(context.Background(), Request{Digest: d})
			if err != nil {
				t.Fatal(err)
			}
			// A reader opened after the task failed gets its error at once.
			if r, err := tk.NewReader(context.Background()); !errors.Is(err, ErrDigestMismatch) {
				if err != nil {
					t.Fatalf("NewReader: %v, want nil or ErrDigestMismatch", err)
				}
				defer r.Close()
				got, err := io.ReadAll(r)
				if !errors.Is(err, ErrDigestMismatch) {
					t.Fatalf("read error %v, want ErrDigestMismatch", err)
				}
				if len(got) >= len(data) {
					t.Fatalf("reader got all %d bytes of a bad blob", len(got))
				}
			}
			if _, err := st.Stat(d); !errors.Is(err, blobstore.ErrNotFound) {
				t.Fatalf("bad blob stored: %v", err)
			}
			if s, ok := m.Stats(d); !ok || s.State != "failed" || s.Verified != 0 {
				t.Fatalf("stats %+v", s)
			}
		})
	}
}

func TestWholeBlobFallback(t *testing.T) {
	data, d := blob(t, int(piece.MinSize)*3)
	src := &fakeSource{data: data, whole: true}
	m, st := newManager(t, src)
	tk, err := m.Open(context.Background(), Request{Digest: d})
	if err != nil {
		t.Fatal(err)
	}
	if err := tk.Wait(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Stat(d); err != nil {
		t.Fatal(err)
	}
	// Workers that raced the first whole response may each have opened one,
	// but no more than the collector's concurrency.
	if n := src.ranges.Load(); n > 4 {
		t.Fatalf("%d whole-blob requests", n)
	}
}

func TestReaderGetsPrefixBeforeCompletion(t *testing.T) {
	data, d := blob(t, int(piece.MinSize)*4)
	src := &fakeSource{data: data, gate: make(chan struct{})}
	m, _ := newManager(t, src)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	tk, r := openReader(t, ctx, m, d)
	src.gate <- struct{}{} // exactly one piece may arrive
	buf := make([]byte, 1000)
	if _, err := io.ReadFull(r, buf); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf, data[:1000]) {
		t.Fatal("prefix differs")
	}
	select {
	case <-tk.Done():
		t.Fatal("task finished with one piece")
	default:
	}
	close(src.gate)
	rest, err := io.ReadAll(r)
	if err != nil || !bytes.Equal(rest, data[1000:]) {
		t.Fatalf("rest: %v", err)
	}
}

func TestRangeReadPrioritised(t *testing.T) {
	data, d := blob(t, int(piece.MinSize)*8)
	src := &fakeSource{data: data, gate: make(chan struct{})}
	m, _ := newManager(t, src)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, r := openReader(t, ctx, m, d)
	off := 6 * piece.MinSize
	r.Seek(off, io.SeekStart)
	got := make(chan []byte, 1)
	go func() {
		b := make([]byte, 10)
		io.ReadFull(r, b)
		got <- b
	}()
	// Workers that started before the reader's seek took pieces from 0 on;
	// the first piece picked after it must be piece 6. So of 4 workers,
	// piece 6 is among the first 5 asked for.
	deadline := time.After(5 * time.Second)
	for {
		select {
		case b := <-got:
			if !bytes.Equal(b, data[off:off+10]) {
				t.Fatal("range bytes differ")
			}
			close(src.gate)
			src.mu.Lock()
			defer src.mu.Unlock()
			if i := slices.Index(src.calls, off); i < 0 || i > 4 {
				t.Fatalf("pieces asked for in order %v; offset %d should be among the first five", src.calls, off)
			}
			return
		case src.gate <- struct{}{}:
		case <-deadline:
			t.Fatal("timeout")
		}
	}
}

// A peer that lies consistently (bad bytes, matching checksum) passes the
// piece checks; the whole-blob digest catches it, readers attached so far
// fail, and the blob is fetched again from the upstream alone.
func TestMismatchWithPeerPiecesRefetchesFromUpstream(t *testing.T) {
	data, d := blob(t, int(piece.MinSize)*2)
	good := &fakeSource{data: data}
	bad := append([]byte(nil), data...)
	bad[10] ^= 1
	liar := &fakeSource{data: bad}
	st, err := blobstore.Open(context.Background(), t.TempDir(), blobstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	var upstreamOnly []bool
	var mu sync.Mutex
	c := collector.New(collector.Options{Concurrency: 2})
	m := NewManager(Options{
		Store: st,
		Sizer: fixedSize(len(data)),
		Filler: fillFunc(func(ctx context.Context, job collector.Job, req Request) error {
			mu.Lock()
			upstreamOnly = append(upstreamOnly, req.UpstreamOnly)
			mu.Unlock()
			run := c.NewRun(job)
			if req.UpstreamOnly {
				run.SetUpstream(c.NewUpstreamParent(good, "", "", req.Digest, nil), true)
				return run.Run(ctx)
			}
			run.SetUpstream(c.NewUpstreamParent(good, "", "", req.Digest, nil), false)
			peer := &liarParent{src: liar}
			run.AddParent(peer)
			// Its checksums match its lies.
			plan := piece.PlanFor(int64(len(bad)))
			var crcs []collector.Held
			for i := range plan.Count() {
				off, n := plan.Range(i)
				crcs = append(crcs, collector.Held{Index: i, CRC: piece.Checksum(bad[off : off+n])})
			}
			run.AnnounceComplete(peer.ID(), crcs)
			return run.Run(ctx)
		}),
	})
	defer m.Close()
	tk, err := m.Open(context.Background(), Request{Digest: d})
	if err != nil {
		t.Fatal(err)
	}
	r, err := tk.NewReader(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if err := tk.Wait(context.Background()); err != nil {
		t.Fatalf("task: %v", err)
	}
	if _, err := io.ReadAll(r); !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("reader attached before the refetch: %v, want ErrDigestMismatch", err)
	}
	if len(upstreamOnly) != 2 || upstreamOnly[0] || !upstreamOnly[1] {
		t.Fatalf("fills %v, want a peer fill then an upstream-only one", upstreamOnly)
	}
	b, err := st.Get(context.Background(), d)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	v := d.Verifier()
	io.Copy(v, b)
	if !v.Verified() {
		t.Fatal("stored blob does not verify")
	}
	if s, _ := m.Stats(d); s.Sources["liar"] != 0 || s.Sources[collector.UpstreamID] != int64(len(data)) {
		t.Fatalf("sources %v", s.Sources)
	}
}

type liarParent struct{ src *fakeSource }

func (l *liarParent) ID() string { return "liar" }
func (l *liarParent) Fetch(ctx context.Context, _ int, off, n int64) (io.ReadCloser, error) {
	rc, _, err := l.src.Blob(ctx, "", "", "", off, n, nil)
	return rc, err
}

// A download nobody reads and no peer wants is stopped after the idle
// grace period, even while its upstream keeps it waiting; a reader or a
// peer's interest keeps it going. Its pieces stay to resume.
func TestIdleDownloadStopped(t *testing.T) {
	data, d := blob(t, int(piece.MinSize)*2)
	src := &fakeSource{data: data, gate: make(chan struct{})} // the upstream never sends
	clock := fakeclock.New(time.Unix(1000, 0))
	m, _ := newManager(t, src, func(o *Options) { o.IdleStop, o.Now = time.Minute, clock.Now })
	tk, err := m.Open(context.Background(), Request{Digest: d})
	if err != nil {
		t.Fatal(err)
	}
	// A reader keeps it going however long it waits.
	r, err := tk.NewReader(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	clock.Add(10 * time.Minute)
	if n := m.StopIdle(); n != 0 {
		t.Fatalf("stopped %d downloads with a reader attached", n)
	}
	r.Close()
	clock.Add(50 * time.Second)
	tk.Touch() // a peer watches it
	clock.Add(50 * time.Second)
	if n := m.StopIdle(); n != 0 {
		t.Fatalf("stopped %d downloads 50 s after a peer's interest", n)
	}
	clock.Add(11 * time.Second)
	if n := m.StopIdle(); n != 1 {
		t.Fatalf("stopped %d downloads idle for 61 s, want 1", n)
	}
	if err := tk.Wait(context.Background()); !errors.Is(err, ErrUnwanted) {
		t.Fatalf("stopped download: %v, want ErrUnwanted", err)
	}
	if _, ok := m.Lookup(d); ok {
		t.Error("the stopped download is still running")
	}
}

// A download still learning its size can be stopped as idle too: the stop
// ends the open, and the caller gets an error (it used to find no stop func).
func TestIdleStopWhileOpening(t *testing.T) {
	data, d := blob(t, int(piece.MinSize))
	clock := fakeclock.New(time.Unix(1000, 0))
	opening := make(chan struct{})
	m, _ := newManager(t, &fakeSource{data: data}, func(o *Options) {
		o.IdleStop, o.Now = time.Minute, clock.Now
		o.Sizer = blockingSize{opening}
	})
	errc := make(chan error, 1)
	go func() { _, err := m.Open(context.Background(), Request{Digest: d}); errc <- err }()
	<-opening
	clock.Add(2 * time.Minute)
	if n := m.StopIdle(); n != 1 {
		t.Fatalf("stopped %d opening downloads, want 1", n)
	}
	if err := <-errc; err == nil {
		t.Fatal("Open succeeded after the download was stopped")
	}
}

func TestDrainRefusesNewDownloads(t *testing.T) {
	data, d := blob(t, int(piece.MinSize))
	m, _ := newManager(t, &fakeSource{data: data})
	m.Drain()
	if _, err := m.Open(context.Background(), Request{Digest: d}); !errors.Is(err, ErrDraining) {
		t.Fatalf("Open while draining: %v", err)
	}
	if r := m.Running(); len(r) != 0 {
		t.Errorf("running after a refused open: %v", r)
	}
}

// Fetch follows a download with no reader to its verified end: progress
// grows to the size, reported last once complete; a stored blob is done at
// once; an upstream failure is the error.
func TestFetch(t *testing.T) {
	data, d := blob(t, int(piece.MinSize)*3)
	src := &fakeSource{data: data}
	m, st := newManager(t, src)
	var reports [][2]int64
	err := m.Fetch(context.Background(), Request{Digest: d, ForPeers: true}, func(done, size int64) error {
		reports = append(reports, [2]int64{done, size})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(reports) == 0 || reports[len(reports)-1] != [2]int64{int64(len(data)), int64(len(data))} {
		t.Fatalf("reports %v: the last must be complete", reports)
	}
	for i, r := range reports {
		if r[1] != int64(len(data)) || (i > 0 && r[0] < reports[i-1][0]) || (i < len(reports)-1 && r[0] == r[1]) {
			t.Fatalf("reports %v: sizes fixed, progress growing, complete only last", reports)
		}
	}
	if _, err := st.Stat(d); err != nil {
		t.Fatalf("not stored after Fetch: %v", err)
	}
	n := 0
	if err := m.Fetch(context.Background(), Request{Digest: d}, func(done, size int64) error { n++; return nil }); err != nil || n != 1 {
		t.Fatalf("Fetch of a stored blob: %v, %d reports", err, n)
	}

	bad := &fakeSource{data: data, corrupt: true}
	m2, st2 := newManager(t, bad)
	if err := m2.Fetch(context.Background(), Request{Digest: d}, func(int64, int64) error { return nil }); !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("Fetch of a corrupt upstream: %v, want ErrDigestMismatch", err)
	}
	if _, err := st2.Stat(d); err == nil {
		t.Fatal("a corrupt blob was stored")
	}
}

// A reader waiting for a piece that will not come, and a peer watching the
// download's changes, both learn when the download fails: the reader gets
// its error after the bytes that did arrive, the watch wakes.
func TestFailureWakesReadersAndWatchers(t *testing.T) {
	data, d := blob(t, int(piece.MinSize)*3)
	errSource := errors.New("source gone")
	put := make(chan struct{})
	fail := make(chan struct{})
	st, err := blobstore.Open(context.Background(), t.TempDir(), blobstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	m := NewManager(Options{
		Store: st,
		Sizer: fixedSize(len(data)),
		Filler: fillFunc(func(ctx context.Context, job collector.Job, _ Request) error {
			off, n := job.Plan().Range(0)
			if err := job.Put(0, bytes.NewReader(data[off:off+n]), "test", collector.Expect{}); err != nil {
				return err
			}
			close(put)
			<-fail
			return errSource
		}),
	})
	defer m.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	tk, r := openReader(t, ctx, m, d)
	<-put
	changed := tk.Changed()
	if done, crc := tk.Pieces(); !slices.Equal(done, []bool{true, false, false}) || crc[0] != piece.Checksum(data[:piece.MinSize]) {
		t.Fatalf("pieces %v %v", done, crc)
	}
	got := make(chan error, 1)
	var n int64
	go func() {
		b, err := io.ReadAll(r)
		n = int64(len(b))
		got <- err
	}()
	close(fail)
	if err := <-got; !errors.Is(err, errSource) {
		t.Fatalf("reader: %v, want %v", err, errSource)
	}
	if _, size := tk.Plan().Range(0); n != size {
		t.Fatalf("reader got %d bytes before the failure, want piece 0's %d", n, size)
	}
	select {
	case <-changed:
	case <-ctx.Done():
		t.Fatal("Changed not closed when the download failed")
	}
}

// openReader opens d's download on m and a reader of it, closed at the
// test's end.
func openReader(t *testing.T, ctx context.Context, m *Manager, d digest.Digest) (*Task, *Reader) {
	t.Helper()
	tk, err := m.Open(ctx, Request{Digest: d})
	if err != nil {
		t.Fatal(err)
	}
	r, err := tk.NewReader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return tk, r
}

// The manager cuts blobs with its planner: a cluster's smallest piece sets
// the pieces of a task, and the blob is assembled and verified from them.
func TestPiecesFromThePlanner(t *testing.T) {
	for _, min := range []int64{piece.LeastMin, 1 << 20, 0} {
		data, d := blob(t, 3<<20+5)
		src := &fakeSource{data: data}
		m, st := newManager(t, src, func(o *Options) { o.Pieces = piece.Planner{Min: min} })
		tk, err := m.Open(context.Background(), Request{Digest: d})
		if err != nil {
			t.Fatal(err)
		}
		want := piece.Planner{Min: min}.For(int64(len(data)))
		if tk.Plan() != want {
			t.Errorf("min %d: plan %+v, want %+v", min, tk.Plan(), want)
		}
		if err := tk.Wait(context.Background()); err != nil {
			t.Fatal(err)
		}
		if _, err := st.Stat(d); err != nil {
			t.Fatalf("min %d: %v", min, err)
		}
		if done, _ := tk.Pieces(); len(done) != want.Count() {
			t.Errorf("min %d: %d pieces, want %d", min, len(done), want.Count())
		}
	}
}
