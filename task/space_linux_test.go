//go:build linux

package task

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/blobstore"
	"github.com/registry-proxy/registry-proxy/internal/fakeclock"
	"github.com/registry-proxy/registry-proxy/p2p/collector"
	"github.com/registry-proxy/registry-proxy/piece"
)

// heldBytes is the space a partial blob's data holds on disk (st_blocks*512).
func heldBytes(t *testing.T, root string, d digest.Digest) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(filepath.Join(root, "ingest", "sha256-"+d.Encoded(), "data"), &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// stagedFiller writes the pieces below stopAt (in order), then fails or
// waits for the download's end; with stopAt < 0 it writes every missing
// piece. puts counts the pieces it wrote.
type stagedFiller struct {
	data   []byte
	stopAt atomic.Int64
	fail   bool
	puts   atomic.Int64
	held   chan struct{} // closed once it stopped writing
	// cont, when set, lets a waiting filler go on with the rest.
	cont chan struct{}
}

func (f *stagedFiller) Fill(ctx context.Context, job collector.Job, _ Request) error {
	stop := int(f.stopAt.Load())
	for i := range job.Plan().Count() {
		if job.Has(i) {
			continue
		}
		if stop >= 0 && i >= stop {
			close(f.held)
			if f.fail {
				return errors.New("the upstream broke off")
			}
			select {
			case <-f.cont:
				stop = -1
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		off, n := job.Plan().Range(i)
		if err := job.Put(i, bytes.NewReader(f.data[off:off+n]), collector.UpstreamID, collector.Expect{}); err != nil {
			return err
		}
		f.puts.Add(1)
	}
	return nil
}

// A download that stops before the end (nobody wants it, the node shuts
// down, it failed) keeps on disk what it wrote and no more; resumed, it
// fetches only the missing pieces and the blob verifies.
func TestStoppedDownloadGivesBackSpace(t *testing.T) {
	const size = 32 << 20
	plan := piece.PlanFor(size)
	for _, tc := range []struct {
		name    string
		written int
		stop    func(t *testing.T, m *Manager, clock *fakeclock.Clock)
		fail    bool
		wantErr error
	}{
		{"idle", 5, func(t *testing.T, m *Manager, clock *fakeclock.Clock) {
			clock.Add(2 * time.Minute)
			if n := m.StopIdle(); n != 1 {
				t.Fatalf("stopped %d idle downloads, want 1", n)
			}
		}, false, ErrUnwanted},
		{"shutdown", 3, func(t *testing.T, m *Manager, _ *fakeclock.Clock) { m.Close() }, false, context.Canceled},
		{"failed", 8, nil, true, nil},
		{"nothing written", 0, func(t *testing.T, m *Manager, clock *fakeclock.Clock) {
			clock.Add(2 * time.Minute)
			m.StopIdle()
		}, false, ErrUnwanted},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			root := t.TempDir()
			data, d := blob(t, size)
			clock := fakeclock.New(time.Unix(1000, 0))
			st, err := blobstore.Open(ctx, root, blobstore.Options{Now: clock.Now})
			if err != nil {
				t.Fatal(err)
			}
			fill := &stagedFiller{data: data, fail: tc.fail, held: make(chan struct{})}
			fill.stopAt.Store(int64(tc.written))
			m := NewManager(Options{Store: st, Sizer: fixedSize(size), Filler: fill, IdleStop: time.Minute, Now: clock.Now})
			defer m.Close()
			tk, err := m.Open(ctx, Request{Digest: d})
			if err != nil {
				t.Fatal(err)
			}
			<-fill.held
			if got := heldBytes(t, root, d); got < size {
				t.Skipf("the file system reserves %d of %d bytes (no fallocate)", got, size)
			}
			if tc.stop != nil {
				tc.stop(t, m, clock)
			}
			err = tk.Wait(ctx)
			if tc.wantErr != nil && !errors.Is(err, tc.wantErr) || err == nil {
				t.Fatalf("stopped download: %v, want %v", err, tc.wantErr)
			}
			written := int64(tc.written) * plan.PieceSize
			got := heldBytes(t, root, d)
			t.Logf("%s after %d of %d bytes: holds %d", tc.name, written, int64(size), got)
			if got < written || got > written+64<<10 {
				t.Fatalf("stopped download holds %d bytes, want about the %d it wrote", got, written)
			}

			// Resumed (after a restart for the shutdown): only the missing
			// pieces are fetched, and the blob verifies.
			if tc.name == "shutdown" {
				if st, err = blobstore.Open(ctx, root, blobstore.Options{Now: clock.Now}); err != nil {
					t.Fatal(err)
				}
			}
			fill.stopAt.Store(-1)
			fill.puts.Store(0)
			m2 := NewManager(Options{Store: st, Sizer: fixedSize(size), Filler: fill, Now: clock.Now})
			defer m2.Close()
			tk, err = m2.Open(ctx, Request{Digest: d})
			if err != nil {
				t.Fatal(err)
			}
			if err := tk.Wait(ctx); err != nil {
				t.Fatalf("resumed download: %v", err)
			}
			if n := fill.puts.Load(); n != int64(plan.Count()-tc.written) {
				t.Errorf("resumed download fetched %d pieces, want the %d missing", n, plan.Count()-tc.written)
			}
			b, err := st.Get(ctx, d)
			if err != nil {
				t.Fatal(err)
			}
			defer b.Close()
			if got, _ := io.ReadAll(b); !bytes.Equal(got, data) {
				t.Fatal("the resumed blob's bytes differ")
			}
		})
	}
}

// On a full disk a new download takes the space of downloads that were
// stopped, never of one that runs: the running one completes, the new one
// proceeds, and the stopped one's blob can still be fetched afresh.
func TestNewDownloadTakesSpaceOfStoppedOnes(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("root, to mount a tmpfs")
	}
	ctx := context.Background()
	root := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", root).CombinedOutput(); err != nil {
		t.Skipf("mount tmpfs: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", root).Run() })
	const mib = 1 << 20
	clock := fakeclock.New(time.Unix(1000, 0))
	st, err := blobstore.Open(ctx, root, blobstore.Options{Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	blobs := map[digest.Digest][]byte{}
	fillers := map[digest.Digest]*stagedFiller{}
	filler := fillFunc(func(ctx context.Context, job collector.Job, req Request) error {
		return fillers[req.Digest].Fill(ctx, job, req)
	})
	sizer := sizeFunc(func(req Request) int64 { return int64(len(blobs[req.Digest])) })
	m := NewManager(Options{Store: st, Sizer: sizer, Filler: filler, IdleStop: time.Minute, Now: clock.Now})
	defer m.Close()
	start := func(size, stopAt int) (digest.Digest, *Task) {
		b, d := blob(t, size)
		blobs[d] = b
		f := &stagedFiller{data: b, held: make(chan struct{}), cont: make(chan struct{})}
		f.stopAt.Store(int64(stopAt))
		fillers[d] = f
		tk, err := m.Open(ctx, Request{Digest: d})
		if err != nil {
			t.Fatalf("download of %d bytes: %v", size, err)
		}
		if stopAt >= 0 {
			<-f.held
		}
		return d, tk
	}
	// Two downloads of 16 MiB abandoned after 2 MiB, and one of 8 MiB
	// running (it waits for a reader's next piece).
	var stopped []digest.Digest
	for range 2 {
		d, _ := start(16*mib, 2)
		stopped = append(stopped, d)
		clock.Add(2 * time.Minute)
		if n := m.StopIdle(); n != 1 {
			t.Fatalf("stopped %d, want 1", n)
		}
		tk, _ := m.Lookup(d)
		if tk != nil {
			tk.Wait(ctx)
		}
	}
	rd, running := start(8*mib, 1)
	r, err := running.NewReader(ctx) // a reader keeps it from being idle
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	// 40 MiB less 8 running and 4 stopped: 28 free. 29 MiB fits once
	// the older stopped download is gone.
	d, tk := start(29*mib, -1)
	if err := tk.Wait(ctx); err != nil {
		t.Fatalf("new download on a full disk: %v", err)
	}
	if _, err := st.Stat(d); err != nil {
		t.Fatal(err)
	}
	for i, sd := range stopped {
		_, err := os.Stat(filepath.Join(root, "ingest", "sha256-"+sd.Encoded()))
		if gone := os.IsNotExist(err); gone != (i == 0) {
			t.Errorf("stopped partial %d (oldest first) collected = %v, want %v", i, gone, i == 0)
		}
	}
	// The running download was not touched: it goes on, completes and
	// verifies.
	close(fillers[rd].cont)
	if err := running.Wait(ctx); err != nil {
		t.Fatalf("the running download after the collection: %v", err)
	}
	b, err := st.Get(ctx, rd)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if got, _ := io.ReadAll(b); !bytes.Equal(got, blobs[rd]) {
		t.Fatal("the running download's blob differs")
	}
}

// sizeFunc is a Sizer written in place.
type sizeFunc func(Request) int64

func (f sizeFunc) BlobSize(_ context.Context, req Request) (int64, error) { return f(req), nil }
