//go:build linux

package blobstore

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/piece"
)

// diskBytes is the space a file holds on disk (st_blocks*512).
func diskBytes(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// writePieces writes and marks done the pieces of b that which lists.
func writePieces(t *testing.T, p *Partial, b []byte, which []int) {
	t.Helper()
	for _, i := range which {
		off, n := p.Plan().Range(i)
		crc, err := p.WritePiece(i, bytes.NewReader(b[off:off+n]))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := p.MarkDone(i, crc); err != nil {
			t.Fatal(err)
		}
	}
}

// hashPartial is the digest of a partial blob's bytes as written.
func hashPartial(t *testing.T, p *Partial) digest.Digest {
	t.Helper()
	d, err := digest.FromReader(io.NewSectionReader(p, 0, p.Plan().Size))
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func canPunch(t *testing.T, dir string) {
	t.Helper()
	f, err := os.CreateTemp(dir, "punch")
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(f.Name())
	defer f.Close()
	if err := allocate(f, 1<<20); err != nil {
		t.Skipf("no fallocate under %s: %v", dir, err)
	}
	if err := punchHole(f, 0, 1<<20); err != nil {
		t.Skipf("no hole punching under %s: %v", dir, err)
	}
}

// A stopped download keeps the pieces it wrote and gives back the rest of
// the space it reserved; resumed, it reserves again, rechecks the kept
// pieces and completes with the blob's digest.
func TestStoppedPartialGivesBackSpace(t *testing.T) {
	const size = 16 << 20 // 1 MiB pieces
	for _, tc := range []struct {
		name    string
		written []int
	}{
		{"none", nil},
		{"first", []int{0}},
		{"prefix", []int{0, 1, 2, 3}},
		{"scattered", []int{1, 5, 6, 11, 15}},
		{"all but one", []int{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 15}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			root := t.TempDir()
			canPunch(t, root)
			clk := &clock{t: time.Unix(1e9, 0)}
			s := newStore(t, root, Options{Now: clk.now})
			b, d := randBlob(t, size)
			plan := piece.PlanFor(size)
			p, err := s.Ingest(ctx, d, plan)
			if err != nil {
				t.Fatal(err)
			}
			data := filepath.Join(s.ingestDir(d), "data")
			if got := diskBytes(t, data); got < size {
				t.Fatalf("running download holds %d bytes, want its whole size %d reserved", got, size)
			}
			writePieces(t, p, b, tc.written)
			p.Close()
			written := int64(len(tc.written)) * plan.PieceSize
			got := diskBytes(t, data)
			t.Logf("stopped with %d bytes written: holds %d of %d", written, got, size)
			if got < written || got > written+64<<10 {
				t.Fatalf("stopped partial holds %d bytes, want about the %d written", got, written)
			}
			if fi, _ := os.Stat(data); fi.Size() != size {
				t.Fatalf("data file is %d bytes, want its size %d kept", fi.Size(), size)
			}
			if others, _ := s.otherUsage(); others != got {
				t.Fatalf("GC counts %d bytes for the stopped partial, it holds %d", others, got)
			}

			// Resume: the written pieces come back checked, the rest is
			// reserved again, and the blob completes.
			p, err = s.Ingest(ctx, d, plan)
			if err != nil {
				t.Fatal(err)
			}
			defer p.Discard()
			for i := range plan.Count() {
				want := false
				for _, w := range tc.written {
					want = want || w == i
				}
				if p.Has(i) != want {
					t.Fatalf("resumed piece %d done = %v, want %v", i, p.Has(i), want)
				}
			}
			if got := diskBytes(t, data); got < size {
				t.Fatalf("resumed download holds %d bytes, want %d reserved", got, size)
			}
			var rest []int
			for i := range plan.Count() {
				if !p.Has(i) {
					rest = append(rest, i)
				}
			}
			writePieces(t, p, b, rest)
			if err := p.Commit(hashPartial(t, p)); err != nil {
				t.Fatal(err)
			}
			blob, err := s.Get(ctx, d)
			if err != nil {
				t.Fatal(err)
			}
			defer blob.Close()
			if got, _ := io.ReadAll(blob); !bytes.Equal(got, b) {
				t.Fatal("resumed blob's bytes differ")
			}
		})
	}
}

// A node that crashed with downloads running left their whole sizes
// reserved: Open gives back what their records do not say is written, and
// drops a directory without metadata (nothing in it can resume).
func TestOpenShrinksLeftPartials(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	canPunch(t, root)
	s := newStore(t, root, Options{})
	const size = 8 << 20
	b, d := randBlob(t, size)
	p, err := s.Ingest(ctx, d, piece.PlanFor(size))
	if err != nil {
		t.Fatal(err)
	}
	writePieces(t, p, b, []int{2, 3})
	p.closeFiles() // a crash: no Close
	stray := filepath.Join(root, "ingest", "sha256-stray")
	os.MkdirAll(stray, 0o755)
	os.WriteFile(filepath.Join(stray, "data"), make([]byte, 4096), 0o644)

	s2 := newStore(t, root, Options{})
	data := filepath.Join(s2.ingestDir(d), "data")
	if got := diskBytes(t, data); got > 2<<20+64<<10 || got < 2<<20 {
		t.Fatalf("after restart the partial holds %d bytes, want the 2 MiB written", got)
	}
	if _, err := os.Stat(stray); !os.IsNotExist(err) {
		t.Fatalf("ingest dir without metadata kept: %v", err)
	}
	p, err = s2.Ingest(ctx, d, piece.PlanFor(size))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Discard()
	if !p.Has(2) || !p.Has(3) || p.Has(0) {
		t.Fatal("resumed pieces after the restart are not the written ones")
	}
}

// tmpfs mounts a small file system, so the disk can be filled.
func tmpfs(t *testing.T, size string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("root, to mount a tmpfs")
	}
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size, "tmpfs", dir).CombinedOutput(); err != nil {
		t.Skipf("mount tmpfs: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", dir).Run() })
	return dir
}

// When a new download cannot reserve its space, partial blobs no download
// has open go, least recently written first, until it fits; a partial a
// download has open and a complete blob being read stay; a download that
// would not fit even then is refused with ErrNoSpace and removes nothing.
func TestReclaimIdlePartialsUnderPressure(t *testing.T) {
	const mib = 1 << 20
	for _, tc := range []struct {
		name string
		need int64 // the new download's size
		// idle partials removed, oldest first
		wantRemoved int
		wantErr     error
	}{
		// 19 MiB free (32 less 2 complete, 8 running, 3 idle) less
		// the file system's own.
		{"fits without", 8 * mib, 0, nil},
		{"oldest goes", 19*mib + mib/2, 1, nil},
		{"all idle go", 21*mib + mib/2, 3, nil},
		// Removing every idle partial would not make room: none goes.
		{"too large", 23 * mib, 0, ErrNoSpace},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			root := tmpfs(t, "32m")
			clk := &clock{t: time.Unix(1e9, 0)}
			s := newStore(t, root, Options{Now: clk.now})
			// A complete 2 MiB blob, open for reading.
			cb, cd := randBlob(t, 2*mib)
			cp, err := s.Ingest(ctx, cd, piece.PlanFor(2*mib))
			if err != nil {
				t.Fatal(err)
			}
			fill(t, cp, cb)
			if err := cp.Commit(cd); err != nil {
				t.Fatal(err)
			}
			cp.Close()
			blob, err := s.Get(ctx, cd)
			if err != nil {
				t.Fatal(err)
			}
			defer blob.Close()
			// Three abandoned downloads of 16 MiB that wrote 1 MiB each,
			// written in the order 0, 1, 2.
			var idle []digest.Digest
			for i := range 3 {
				b, d := randBlob(t, 16*mib)
				p, err := s.Ingest(ctx, d, piece.PlanFor(16*mib))
				if err != nil {
					t.Fatal(err)
				}
				writePieces(t, p, b, []int{i})
				p.Close()
				when := time.Now().Add(time.Duration(i-10) * time.Minute)
				os.Chtimes(filepath.Join(s.ingestDir(d), "pieces"), when, when)
				idle = append(idle, d)
			}
			// A running download of 8 MiB, 1 MiB written.
			rb, rd := randBlob(t, 8*mib)
			running, err := s.Ingest(ctx, rd, piece.PlanFor(8*mib))
			if err != nil {
				t.Fatal(err)
			}
			defer running.Discard()
			writePieces(t, running, rb, []int{0})
			free, _ := freeBytes(root)
			t.Logf("before: %d bytes free; the new download needs %d", free, tc.need)

			_, nd := randBlob(t, int(tc.need))
			np, err := s.Ingest(ctx, nd, piece.PlanFor(tc.need))
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("new download of %d bytes: %v, want %v", tc.need, err, tc.wantErr)
			}
			if err == nil {
				defer np.Discard()
			}
			free, _ = freeBytes(root)
			t.Logf("after: %d bytes free", free)
			for i, d := range idle {
				_, err := os.Stat(s.ingestDir(d))
				if gone := os.IsNotExist(err); gone != (i < tc.wantRemoved) {
					t.Errorf("idle partial %d (oldest first) removed = %v, want %v", i, gone, i < tc.wantRemoved)
				}
			}
			// The running download and the blob being read are intact.
			writePieces(t, running, rb, []int{1, 2, 3, 4, 5, 6, 7})
			if !running.Has(0) {
				t.Fatal("the running download lost a piece")
			}
			if err := running.Commit(hashPartial(t, running)); err != nil {
				t.Fatalf("running download after the reclaim: %v", err)
			}
			if got, _ := io.ReadAll(blob); !bytes.Equal(got, cb) {
				t.Fatal("the blob being read changed")
			}
		})
	}
}

// Above the high water mark with no complete blob left to evict, GC
// removes partial blobs no download has open, least recently written
// first; an open one stays.
func TestGCRemovesIdlePartialsAboveHighWater(t *testing.T) {
	const mib = 1 << 20
	for _, tc := range []struct {
		name        string
		high        int64
		wantRemoved int // idle partials removed, oldest first
	}{
		{"below the mark", 64 * mib, 0},
		// 8 MiB open, 3 idle of 1 MiB: 11 MiB; down to 9.
		{"oldest two", 10 * mib, 2},
		{"all idle", 4 * mib, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			root := t.TempDir()
			canPunch(t, root)
			s := newStore(t, root, Options{HighWater: tc.high, LowWater: tc.high * 9 / 10})
			var idle []digest.Digest
			for i := range 3 {
				b, d := randBlob(t, 16*mib)
				p, err := s.Ingest(ctx, d, piece.PlanFor(16*mib))
				if err != nil {
					t.Fatal(err)
				}
				writePieces(t, p, b, []int{i})
				p.Close()
				when := time.Now().Add(time.Duration(i-10) * time.Minute)
				os.Chtimes(filepath.Join(s.ingestDir(d), "pieces"), when, when)
				idle = append(idle, d)
			}
			_, rd := randBlob(t, 8*mib)
			running, err := s.Ingest(ctx, rd, piece.PlanFor(8*mib))
			if err != nil {
				t.Fatal(err)
			}
			defer running.Discard()
			res, err := s.GC(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if res.Partials != tc.wantRemoved {
				t.Errorf("GC removed %d partials, want %d", res.Partials, tc.wantRemoved)
			}
			for i, d := range idle {
				_, err := os.Stat(s.ingestDir(d))
				if gone := os.IsNotExist(err); gone != (i < tc.wantRemoved) {
					t.Errorf("idle partial %d removed = %v, want %v", i, gone, i < tc.wantRemoved)
				}
			}
			if _, err := os.Stat(s.ingestDir(rd)); err != nil {
				t.Fatalf("the open partial was removed: %v", err)
			}
		})
	}
}
