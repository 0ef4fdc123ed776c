package ctrstore

import (
	"bytes"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
)

// memReaderAt is a blob in memory as containerd's API reader; it counts
// the reads, each a round trip there.
type memReaderAt struct {
	*bytes.Reader
	reads int
}

func (m *memReaderAt) ReadAt(p []byte, off int64) (int, error) {
	m.reads++
	return m.Reader.ReadAt(p, off)
}
func (m *memReaderAt) Close() error { return nil }

// apiReader reads, seeks and reads at offsets as a file would, and asks the
// API for big chunks.
func TestAPIReaderAsAFile(t *testing.T) {
	blob := make([]byte, 3*apiChunk+12345)
	for i := range blob {
		blob[i] = byte(i * 7)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	pool := &New(Options{}).bufs
	for round := range 15 {
		ra := &memReaderAt{Reader: bytes.NewReader(blob)}
		r := &apiReader{ra: ra, size: int64(len(blob)), pool: pool}
		want := bytes.NewReader(blob)
		for op := range 20 {
			switch rng.IntN(3) {
			case 0:
				n := rng.IntN(2*apiChunk) + 1
				got, gerr := io.ReadFull(r, make([]byte, n))
				exp, eerr := io.ReadFull(want, make([]byte, n))
				if got != exp || (gerr == nil) != (eerr == nil) {
					t.Fatalf("round %d op %d: read %d: got %d, %v; want %d, %v", round, op, n, got, gerr, exp, eerr)
				}
			case 1:
				off := rng.Int64N(int64(len(blob)) + 10)
				g, _ := r.Seek(off, io.SeekStart)
				w, _ := want.Seek(off, io.SeekStart)
				if g != w {
					t.Fatalf("seek %d: %d, want %d", off, g, w)
				}
			case 2:
				off, n := rng.Int64N(int64(len(blob))), rng.IntN(apiChunk)+1
				gb, wb := make([]byte, n), make([]byte, n)
				g, gerr := r.ReadAt(gb, off)
				w, werr := want.ReadAt(wb, off)
				if g != w || !bytes.Equal(gb[:g], wb[:w]) || (gerr == nil) != (werr == nil) {
					t.Fatalf("read at %d of %d: %d, %v; want %d, %v", off, n, g, gerr, w, werr)
				}
			}
		}
	}
	// A whole read costs one API read per chunk.
	ra := &memReaderAt{Reader: bytes.NewReader(blob)}
	got, err := io.ReadAll(&apiReader{ra: ra, size: int64(len(blob)), pool: pool})
	if err != nil || !bytes.Equal(got, blob) {
		t.Fatalf("read all: %d bytes, %v", len(got), err)
	}
	if ra.reads != 4 {
		t.Errorf("%d API reads for %d bytes, want 4", ra.reads, len(blob))
	}
}

// The index follows events per namespace: a blob stays while any watched
// namespace holds it, and every change is signalled.
func TestIndexFollowsNamespaces(t *testing.T) {
	s := New(Options{Namespaces: []string{"k8s.io", "moby"}})
	d := digest.FromString("layer")
	ch := s.Changed()
	s.add("k8s.io", d, 5)
	select {
	case <-ch:
	default:
		t.Fatal("adding a blob was not signalled")
	}
	s.add("moby", d, 5)
	if size, ok := s.Stat(d); !ok || size != 5 {
		t.Fatalf("Stat = %d, %v", size, ok)
	}
	s.remove("k8s.io", d)
	if _, ok := s.Stat(d); !ok {
		t.Fatal("a blob another namespace holds was dropped")
	}
	ch = s.Changed()
	s.remove("moby", d)
	if _, ok := s.Stat(d); ok {
		t.Fatal("a blob no namespace holds is still listed")
	}
	select {
	case <-ch:
	default:
		t.Fatal("removing a blob was not signalled")
	}
	if s.watched("default") || !s.watched("moby") {
		t.Error("watched namespaces wrong")
	}
	if _, _, err := s.Open(t.Context(), d); err == nil {
		t.Error("opened a blob containerd does not hold")
	}
}

// A socket path that is missing, or is something else (a directory a
// container runtime created for a missing hostPath), is named as such
// before any dial; a socket, or an address that is no path, passes.
func TestCheckSocket(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "c.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(dir, "missing.sock")
	for _, tc := range []struct{ address, want string }{
		{sock, ""},
		{"unix://" + sock, ""},
		{"tcp://127.0.0.1:1", ""},
		{missing, "no socket at " + missing + ": containerd is not running, or keeps its socket elsewhere"},
		{"unix://" + missing, "no socket at " + missing + ":"},
		{dir, dir + " is not a socket but a directory"},
		{file, file + " is not a socket but a regular file"},
	} {
		err := checkSocket(tc.address)
		if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("checkSocket(%s) = %v, want %q", tc.address, err, tc.want)
		}
	}
}
