package blobstore

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/piece"
)

type clock struct{ t time.Time }

func (c *clock) now() time.Time { return c.t }

func newStore(t *testing.T, root string, opts Options) *Store {
	t.Helper()
	s, err := Open(context.Background(), root, opts)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func randBlob(t *testing.T, n int) ([]byte, digest.Digest) {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b, digest.FromBytes(b)
}

// fill writes every piece of b into p and marks it done.
func fill(t *testing.T, p *Partial, b []byte) {
	t.Helper()
	plan := p.Plan()
	for i := 0; i < plan.Count(); i++ {
		off, n := plan.Range(i)
		crc, err := p.WritePiece(i, bytes.NewReader(b[off:off+n]))
		if err != nil {
			t.Fatal(err)
		}
		if crc != piece.Checksum(b[off:off+n]) {
			t.Fatalf("piece %d checksum", i)
		}
		if _, err := p.MarkDone(i, crc); err != nil {
			t.Fatal(err)
		}
	}
}

func TestCommitAndGet(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	s := newStore(t, root, Options{})
	b, d := randBlob(t, int(piece.MinSize)*2+123)
	p, err := s.Ingest(ctx, d, piece.PlanFor(int64(len(b))))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Ingest(ctx, d, piece.PlanFor(int64(len(b)))); !errors.Is(err, ErrBusy) {
		t.Fatalf("second Ingest: %v, want ErrBusy", err)
	}
	if _, err := s.Get(context.Background(), d); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get before commit: %v", err)
	}
	if err := p.Commit(d); err == nil {
		t.Fatal("Commit with missing pieces succeeded")
	}
	fill(t, p, b)
	if err := p.Commit(digest.FromString("other")); !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("Commit with wrong digest: %v", err)
	}
	if _, err := s.Get(context.Background(), d); !errors.Is(err, ErrNotFound) {
		t.Fatal("blob visible after refused commit")
	}
	if err := p.Commit(d); err != nil {
		t.Fatal(err)
	}
	p.Close()
	if _, err := os.Stat(s.ingestDir(d)); !os.IsNotExist(err) {
		t.Fatalf("ingest dir left after commit: %v", err)
	}

	// Reopen: the blob survives a restart.
	s2 := newStore(t, root, Options{})
	blob, err := s2.Get(context.Background(), d)
	if err != nil {
		t.Fatal(err)
	}
	defer blob.Close()
	got, _ := io.ReadAll(blob)
	if !bytes.Equal(got, b) || blob.Size != int64(len(b)) {
		t.Fatal("blob content differs after reopen")
	}
	if n, total := s2.Usage(); n != 1 || total != int64(len(b)) {
		t.Fatalf("Usage = %d, %d", n, total)
	}
}

// holdSync makes s's next commit sync close syncing and wait for release.
func holdSync(s *Store) (syncing, release chan struct{}) {
	syncing, release = make(chan struct{}), make(chan struct{})
	s.syncData = func(f *os.File) error {
		close(syncing)
		<-release
		return f.Sync()
	}
	return syncing, release
}

// TestCommitSyncsWithoutTheLock: while a commit syncs the data (seconds on
// a busy disk), the partial blob still opens for peers, says what it holds
// and refuses a second commit; the blob is complete once the sync returns.
func TestCommitSyncsWithoutTheLock(t *testing.T) {
	ctx := context.Background()
	s := newStore(t, t.TempDir(), Options{})
	syncing, release := holdSync(s)
	b, d := randBlob(t, int(piece.MinSize)+7)
	p, err := s.Ingest(ctx, d, piece.PlanFor(int64(len(b))))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	fill(t, p, b)
	committed := make(chan error, 1)
	go func() { committed <- p.Commit(d) }()
	<-syncing
	f, err := p.OpenData()
	if err != nil {
		t.Fatalf("OpenData while the commit syncs: %v", err)
	}
	defer f.Close()
	off, n := p.Plan().Range(1)
	got := make([]byte, n)
	if _, err := f.ReadAt(got, off); err != nil || !bytes.Equal(got, b[off:off+n]) {
		t.Fatalf("piece 1 while the commit syncs: %v", err)
	}
	if done, crc := p.Pieces(); !p.Has(1) || !p.Complete() || len(crc) != 2 || !slices.Equal(done, []bool{true, true}) {
		t.Fatal("the partial blob forgot its pieces while the commit syncs")
	}
	if err := p.Commit(d); err == nil {
		t.Fatal("a second commit while the first syncs succeeded")
	}
	if _, err := s.Get(ctx, d); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get before the sync returned: %v, want ErrNotFound", err)
	}
	close(release)
	if err := <-committed; err != nil {
		t.Fatal(err)
	}
	blob, err := s.Get(ctx, d)
	if err != nil {
		t.Fatal(err)
	}
	defer blob.Close()
	if all, _ := io.ReadAll(blob); !bytes.Equal(all, b) {
		t.Fatal("committed blob differs")
	}
	// The file opened during the sync still reads after the rename.
	if _, err := f.ReadAt(got, off); err != nil || !bytes.Equal(got, b[off:off+n]) {
		t.Fatalf("piece 1 after the commit, through the file opened before: %v", err)
	}
}

func TestPieceLength(t *testing.T) {
	s := newStore(t, t.TempDir(), Options{})
	b, d := randBlob(t, 1000)
	p, err := s.Ingest(context.Background(), d, piece.PlanFor(1000))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Discard()
	for _, in := range [][]byte{b[:999], append(b, 1)} {
		if _, err := p.WritePiece(0, bytes.NewReader(in)); !errors.Is(err, ErrPieceLength) {
			t.Errorf("WritePiece(%d bytes) = %v, want ErrPieceLength", len(in), err)
		}
	}
}

func TestResumeRechecksPieces(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	s := newStore(t, root, Options{})
	b, d := randBlob(t, int(piece.MinSize)*3)
	plan := piece.PlanFor(int64(len(b)))
	p, err := s.Ingest(ctx, d, plan)
	if err != nil {
		t.Fatal(err)
	}
	fill(t, p, b)
	p.Close() // crash before commit

	// Corrupt piece 1 on disk.
	f, err := os.OpenFile(filepath.Join(s.ingestDir(d), "data"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	off, _ := plan.Range(1)
	f.WriteAt([]byte("garbage"), off+10)
	f.Close()

	s2 := newStore(t, root, Options{})
	p2, err := s2.Ingest(ctx, d, plan)
	if err != nil {
		t.Fatal(err)
	}
	defer p2.Discard()
	want := []bool{true, false, true}
	if got, _ := p2.Pieces(); !slices.Equal(got, want) {
		t.Fatalf("resumed bitmap %v, want %v", got, want)
	}
}

func TestGC(t *testing.T) {
	ctx := context.Background()
	const size = 1000
	tests := []struct {
		name     string
		opts     Options
		advance  time.Duration
		hold     int // index of a blob kept open during GC, -1 for none
		wantLeft []int
	}{
		{"under high water", Options{HighWater: 5 * size}, 0, -1, []int{0, 1, 2, 3}},
		{"evict oldest to low water", Options{HighWater: 3 * size, LowWater: 2 * size}, 0, -1, []int{2, 3}},
		{"never evict a blob in use", Options{HighWater: 3 * size, LowWater: 2 * size}, 0, 0, []int{0, 3}},
		{"max age", Options{MaxAge: time.Hour}, 90 * time.Minute, -1, []int{3}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clk := &clock{t: time.Unix(1e9, 0)}
			tt.opts.Now = clk.now
			s := newStore(t, t.TempDir(), tt.opts)
			var ds []digest.Digest
			for i := 0; i < 4; i++ {
				ds = append(ds, storeBlob(t, s, size))
				if i == 2 {
					clk.t = clk.t.Add(tt.advance)
				}
				clk.t = clk.t.Add(time.Second)
			}
			if tt.hold >= 0 {
				b, err := s.Get(context.Background(), ds[tt.hold])
				if err != nil {
					t.Fatal(err)
				}
				defer b.Close()
			}
			if _, err := s.GC(ctx); err != nil {
				t.Fatal(err)
			}
			var left []int
			for i, d := range ds {
				if _, err := s.Stat(d); err == nil {
					left = append(left, i)
					if _, err := os.Stat(s.blobPath(d)); err != nil {
						t.Errorf("blob %d indexed but file gone: %v", i, err)
					}
				} else if _, err := os.Stat(s.blobPath(d)); err == nil {
					t.Errorf("blob %d evicted but file remains", i)
				}
			}
			if !slices.Equal(left, tt.wantLeft) {
				t.Fatalf("left %v, want %v", left, tt.wantLeft)
			}
		})
	}
}

// storeBlob ingests and commits a random blob of size bytes.
func storeBlob(t *testing.T, s *Store, size int64) digest.Digest {
	t.Helper()
	b, d := randBlob(t, int(size))
	p, err := s.Ingest(context.Background(), d, piece.PlanFor(size))
	if err != nil {
		t.Fatal(err)
	}
	fill(t, p, b)
	if err := p.Commit(d); err != nil {
		t.Fatal(err)
	}
	p.Close()
	return d
}

func TestGCAbandonedPartials(t *testing.T) {
	ctx := context.Background()
	clk := &clock{t: time.Now().Add(2 * time.Hour)}
	s := newStore(t, t.TempDir(), Options{MaxAge: time.Hour, Now: clk.now})
	_, d1 := randBlob(t, 10)
	_, d2 := randBlob(t, 10)
	p1, _ := s.Ingest(ctx, d1, piece.PlanFor(10))
	p1.Close() // abandoned
	p2, _ := s.Ingest(ctx, d2, piece.PlanFor(10))
	defer p2.Discard()
	res, err := s.GC(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if res.Partials != 1 {
		t.Fatalf("removed %d partials, want 1", res.Partials)
	}
	if _, err := os.Stat(s.ingestDir(d2)); err != nil {
		t.Fatal("open partial removed")
	}
}

func TestManifest(t *testing.T) {
	s := newStore(t, t.TempDir(), Options{})
	m := []byte(`{"schemaVersion":2}`)
	d := digest.FromBytes(m)
	if err := s.PutManifest(digest.FromString("x"), "t", m); !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("PutManifest with wrong digest: %v", err)
	}
	if err := s.PutManifest(d, "application/vnd.oci.image.manifest.v1+json", m); err != nil {
		t.Fatal(err)
	}
	mt, got, err := s.GetManifest(d)
	if err != nil || mt != "application/vnd.oci.image.manifest.v1+json" || !bytes.Equal(got, m) {
		t.Fatalf("GetManifest = %q %q %v", mt, got, err)
	}
	os.WriteFile(s.manifestPath(d), []byte("tampered"), 0o644)
	if _, _, err := s.GetManifest(d); !errors.Is(err, ErrNotFound) {
		t.Fatalf("tampered manifest: %v", err)
	}
}

// The space partial blobs reserve and the manifests count toward the high
// water mark: blobs go first, then manifests, oldest first.
func TestGCCountsPartialsAndManifests(t *testing.T) {
	ctx := context.Background()
	const size = 1000
	clk := &clock{t: time.Unix(1e9, 0)}
	s := newStore(t, t.TempDir(), Options{HighWater: 3 * size, LowWater: 5 * size / 2, Now: clk.now})
	var ds []digest.Digest
	for i := 0; i < 2; i++ {
		ds = append(ds, storeBlob(t, s, size))
		clk.t = clk.t.Add(time.Second)
	}
	// A download in progress reserves 1500 bytes: 3500 in all.
	_, pd := randBlob(t, 1500)
	p, err := s.Ingest(ctx, pd, piece.PlanFor(1500))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Discard()
	res, err := s.GC(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Stat(ds[0]); err == nil || res.Removed != 1 {
		t.Fatalf("removed %d blobs (oldest left: %v); the partial's reserved space was not counted", res.Removed, err)
	}
	if _, err := s.Stat(ds[1]); err != nil {
		t.Fatalf("the newer blob went too: %v", err)
	}
	// Manifests: 2500 bytes of them on top of the 1000-byte blob and the
	// 1500-byte partial: the blob goes first, then the oldest manifests
	// until the store is down to the low water mark.
	var ms []digest.Digest
	for i := 0; i < 5; i++ {
		m := bytes.Repeat([]byte{byte('a' + i)}, 500)
		d := digest.FromBytes(m)
		if err := s.PutManifest(d, "application/vnd.oci.image.manifest.v1+json", m); err != nil {
			t.Fatal(err)
		}
		old := time.Now().Add(time.Duration(i-10) * time.Minute) // manifest 0 the oldest
		os.Chtimes(s.manifestPath(d), old, old)
		ms = append(ms, d)
	}
	res, err = s.GC(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if res.Removed != 1 || res.Manifests != 3 {
		t.Fatalf("GC removed %d blobs and %d manifests; want the blob and the oldest manifests", res.Removed, res.Manifests)
	}
	if _, _, err := s.GetManifest(ms[0]); !errors.Is(err, ErrNotFound) {
		t.Errorf("the oldest manifest survived: %v", err)
	}
	if _, _, err := s.GetManifest(ms[4]); err != nil {
		t.Errorf("the newest manifest went: %v", err)
	}
}

func TestSetLimits(t *testing.T) {
	ctx := context.Background()
	const size = 1000
	s := newStore(t, t.TempDir(), Options{})
	for range 4 {
		storeBlob(t, s, size)
	}
	if _, err := s.GC(ctx); err != nil {
		t.Fatal(err)
	}
	if n, _ := s.Usage(); n != 4 {
		t.Fatalf("%d blobs without marks", n)
	}
	s.SetLimits(2*size, 0, 0) // low water: 90% of high
	if _, err := s.GC(ctx); err != nil {
		t.Fatal(err)
	}
	if n, b := s.Usage(); n != 1 || b > 2*size*9/10 {
		t.Errorf("after SetLimits(2000): %d blobs, %d bytes", n, b)
	}
}

// closed reports whether ch is closed now.
func closed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// TestPartialChanges: the partial blob alone says which pieces are done, and
// wakes its waiters at each change: a piece done, a reset, the commit
// sealing the bytes (before they sync) and completing the blob, the close.
func TestPartialChanges(t *testing.T) {
	ctx := context.Background()
	s := newStore(t, t.TempDir(), Options{})
	syncing, release := holdSync(s)
	b, d := randBlob(t, int(piece.MinSize)*3+5)
	plan := piece.PlanFor(int64(len(b)))
	p, err := s.Ingest(ctx, d, plan)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()

	put := func(i int) {
		t.Helper()
		off, n := plan.Range(i)
		crc, err := p.WritePiece(i, bytes.NewReader(b[off:off+n]))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := p.MarkDone(i, crc); err != nil {
			t.Fatal(err)
		}
	}
	off1, _ := plan.Range(1)
	off2, _ := plan.Range(2)
	off3, _ := plan.Range(3)

	ch := p.Changed()
	off, n := plan.Range(1)
	if _, err := p.WritePiece(1, bytes.NewReader(b[off:off+n])); err != nil {
		t.Fatal(err)
	}
	if closed(ch) || p.Has(1) {
		t.Fatal("a piece written but not marked done counts as a change")
	}
	put(1)
	if !closed(ch) {
		t.Fatal("Changed not closed when a piece was done")
	}
	for _, c := range []struct {
		off, end int64
	}{{0, 0}, {off1, off2}, {off1 + 10, off2}, {off2, off2}, {int64(len(b)), int64(len(b))}} {
		if st := p.StateAt(c.off); st.End != c.end || st.Sealed || st.Resets != 0 || st.Closed {
			t.Fatalf("StateAt(%d) = %+v, want end %d", c.off, st, c.end)
		}
	}
	put(2)
	put(3)
	if st := p.StateAt(off1); st.End != int64(len(b)) {
		t.Fatalf("run to the blob's end: %+v", st)
	}
	if st := p.StateAt(off3); st.End != int64(len(b)) {
		t.Fatalf("last piece: %+v", st)
	}

	ch = p.Changed()
	if err := p.Reset(); err != nil {
		t.Fatal(err)
	}
	if st := p.StateAt(off1); !closed(ch) || st.End != off1 || st.Resets != 1 {
		t.Fatalf("after Reset: closed %v, %+v", closed(ch), st)
	}
	if done, crc := p.Pieces(); slices.Contains(done, true) || slices.ContainsFunc(crc, func(c uint32) bool { return c != 0 }) {
		t.Fatalf("pieces kept after Reset: %v %v", done, crc)
	}

	fill(t, p, b)
	ch = p.Changed()
	committed := make(chan error, 1)
	go func() { committed <- p.Commit(d) }()
	<-syncing
	if st := p.StateAt(0); !closed(ch) || !st.Sealed || closed(st.Changed) {
		t.Fatalf("while the commit syncs: closed %v, %+v", closed(ch), st)
	}
	ch = p.StateAt(0).Changed
	close(release)
	if err := <-committed; err != nil {
		t.Fatal(err)
	}
	if !closed(ch) {
		t.Fatal("Changed not closed when the blob was committed")
	}
	ch = p.Changed()
	p.Close()
	if !closed(ch) || !closed(p.Changed()) || !p.StateAt(0).Closed {
		t.Fatal("a closed partial must say so, and its Changed stay closed")
	}
}
