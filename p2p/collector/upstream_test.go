package collector

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/opencontainers/go-digest"
)

// rangeSource is a registry that honours Range or ignores it (whole), and
// counts its requests and the bodies left open.
type rangeSource struct {
	data     []byte
	whole    bool
	truncate int64 // a whole body ends this many bytes early
	requests atomic.Int64
	open     atomic.Int64
}

type trackedBody struct {
	io.Reader
	src  *rangeSource
	once sync.Once
}

func (b *trackedBody) Close() error {
	b.once.Do(func() { b.src.open.Add(-1) })
	return nil
}

func (s *rangeSource) Blob(ctx context.Context, _, _ string, _ digest.Digest, off, n int64, _ http.Header) (io.ReadCloser, bool, error) {
	if err := ctx.Err(); err != nil {
		return nil, false, err
	}
	s.requests.Add(1)
	s.open.Add(1)
	if s.whole {
		return &trackedBody{Reader: bytes.NewReader(s.data[:int64(len(s.data))-s.truncate]), src: s}, true, nil
	}
	return &trackedBody{Reader: bytes.NewReader(s.data[off : off+n]), src: s}, false, nil
}

func readPiece(t *testing.T, p Parent, i int, size int64) ([]byte, error) {
	t.Helper()
	body, err := p.Fetch(context.Background(), i, int64(i)*size, size)
	if err != nil {
		return nil, err
	}
	defer body.Close()
	return io.ReadAll(body)
}

func TestUpstreamParent(t *testing.T) {
	const size = 100
	data := make([]byte, 5*size)
	for i := range data {
		data[i] = byte(i * 7)
	}
	for _, tc := range []struct {
		name     string
		whole    bool
		truncate int64
		order    []int
		requests int64  // Blob calls
		fails    []bool // per fetch: an error expected
	}{
		{"honours Range: one request a piece", false, 0, []int{0, 3, 1}, 3, nil},
		{"ignores Range: one stream for the pieces in order", true, 0, []int{0, 1, 2, 3, 4}, 2, nil},
		{"ignores Range: skips to a later piece", true, 0, []int{0, 2, 4}, 2, nil},
		{"ignores Range: a piece behind the stream opens it again", true, 0, []int{3, 1, 2}, 3, nil},
		{"ignores Range: a short blob fails its last piece", true, 50, []int{0, 4}, 2, []bool{false, true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src := &rangeSource{data: data, whole: tc.whole, truncate: tc.truncate}
			p := New(Options{Logger: slog.New(slog.DiscardHandler)}).NewUpstreamParent(src, "r", "repo", digest.FromBytes(data), nil)
			for k, i := range tc.order {
				got, err := readPiece(t, p, i, size)
				wantErr := tc.fails != nil && tc.fails[k]
				if wantErr {
					if !errors.Is(err, io.ErrUnexpectedEOF) {
						t.Fatalf("piece %d: %v, want io.ErrUnexpectedEOF", i, err)
					}
					continue
				}
				if err != nil {
					t.Fatalf("piece %d: %v", i, err)
				}
				if !bytes.Equal(got, data[i*size:(i+1)*size]) {
					t.Fatalf("piece %d: wrong bytes", i)
				}
			}
			if n := src.requests.Load(); n != tc.requests {
				t.Errorf("%d requests, want %d", n, tc.requests)
			}
			p.(io.Closer).Close()
			if n := src.open.Load(); n != 0 {
				t.Errorf("%d bodies left open after Close", n)
			}
		})
	}
}

// Pieces of a Range-ignoring registry take turns on the stream; one that
// waits gives up when its context ends, and one whose reader stops early
// leaves the next a fresh stream.
func TestUpstreamStreamTurns(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const size = 100
		data := make([]byte, 4*size)
		for i := range data {
			data[i] = byte(i)
		}
		src := &rangeSource{data: data, whole: true}
		p := New(Options{Logger: slog.New(slog.DiscardHandler)}).NewUpstreamParent(src, "r", "repo", digest.FromBytes(data), nil)
		defer p.(io.Closer).Close()

		first, err := p.Fetch(context.Background(), 0, 0, size)
		if err != nil {
			t.Fatal(err)
		}
		// While the first piece holds the stream, the next waits; a
		// third gives up with its context.
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		if _, err := p.Fetch(ctx, 2, 2*size, size); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("waiting piece: %v, want its context's error", err)
		}
		got := make(chan []byte, 1)
		go func() {
			b, err := readPiece(t, p, 1, size)
			if err != nil {
				t.Error(err)
			}
			got <- b
		}()
		synctest.Wait()
		select {
		case <-got:
			t.Fatal("a second piece read the stream while the first held it")
		default:
		}
		// The first reader stops after 10 bytes: the stream's place is
		// lost, so the waiting piece opens it again.
		buf := make([]byte, 10)
		if _, err := io.ReadFull(first, buf); err != nil {
			t.Fatal(err)
		}
		first.Close()
		if b := <-got; !bytes.Equal(b, data[size:2*size]) {
			t.Fatal("piece 1: wrong bytes")
		}
		if n := src.requests.Load(); n != 3 {
			t.Errorf("%d requests, want 3 (the first, its stream, the stream again)", n)
		}
	})
}
