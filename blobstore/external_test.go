package blobstore

import (
	"bytes"
	"context"
	"errors"
	"io"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/registry-proxy/registry-proxy/piece"
)

// memExternal is an external store in memory.
type memExternal struct {
	mu      sync.Mutex
	blobs   map[digest.Digest][]byte
	changed chan struct{}
}

type nopCloser struct{ *bytes.Reader }

func (nopCloser) Close() error { return nil }

func newMemExternal() *memExternal {
	return &memExternal{blobs: map[digest.Digest][]byte{}, changed: make(chan struct{})}
}

func (m *memExternal) put(b []byte) digest.Digest {
	m.mu.Lock()
	defer m.mu.Unlock()
	d := digest.FromBytes(b)
	m.blobs[d] = b
	close(m.changed)
	m.changed = make(chan struct{})
	return d
}

func (m *memExternal) Stat(d digest.Digest) (int64, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	b, ok := m.blobs[d]
	return int64(len(b)), ok
}

func (m *memExternal) Open(_ context.Context, d digest.Digest) (Content, int64, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	b, ok := m.blobs[d]
	if !ok {
		return nil, 0, errors.New("gone")
	}
	return nopCloser{bytes.NewReader(b)}, int64(len(b)), nil
}

func (m *memExternal) Blobs() map[digest.Digest]int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := map[digest.Digest]int64{}
	for d, b := range m.blobs {
		out[d] = int64(len(b))
	}
	return out
}

func (m *memExternal) Changed() <-chan struct{} {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.changed
}

// Get and Stat find the external store's blobs; Complete lists both
// stores'; this store's copy of a blob the external store holds goes, a
// copy being read only once it is closed.
func TestExternalStore(t *testing.T) {
	ext := newMemExternal()
	s := newStore(t, t.TempDir(), Options{External: ext})
	theirs := ext.put([]byte("containerd's blob"))
	if size, err := s.Stat(theirs); err != nil || size != 17 {
		t.Fatalf("Stat(external) = %d, %v", size, err)
	}
	b, err := s.Get(context.Background(), theirs)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(b)
	b.Close()
	if string(got) != "containerd's blob" || !b.External {
		t.Fatalf("Get(external) = %q, external %v", got, b.External)
	}
	if _, err := s.Get(context.Background(), digest.FromString("nowhere")); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get(missing) = %v", err)
	}

	mine := storeBlob(t, s, 4096)
	both := storeBlob(t, s, 8192)
	if n := len(s.Complete()); n != 3 {
		t.Fatalf("Complete lists %d blobs, want 3", n)
	}
	reading, err := s.Get(context.Background(), both)
	if err != nil {
		t.Fatal(err)
	}
	own, _ := io.ReadAll(reading)
	ch := s.Changed()
	ext.put(own)
	if busy := s.dropShadowed(); !busy {
		t.Fatal("a copy being read was not reported busy")
	}
	if _, total := s.Usage(); total != 4096+8192 {
		t.Fatalf("a copy being read was dropped: %d bytes kept", total)
	}
	reading.Close()
	if busy := s.dropShadowed(); busy {
		t.Fatal("still busy after the reader closed")
	}
	if n, total := s.Usage(); n != 1 || total != 4096 {
		t.Fatalf("after the drop: %d blobs, %d bytes; want only %s", n, total, mine)
	}
	select {
	case <-ch:
	default:
		t.Fatal("the drop was not signalled")
	}
	// Still served, from the external store.
	b, err = s.Get(context.Background(), both)
	if err != nil || !b.External {
		t.Fatalf("Get after the drop: %v", err)
	}
	b.Close()
}

// RunGC drops this store's copy as soon as the external store gains the
// blob, and again shortly after when the copy was being read.
func TestRunGCDropsShadowedCopies(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ext := newMemExternal()
		s := newStore(t, t.TempDir(), Options{External: ext})
		d := storeBlob(t, s, 4096)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() {
			defer close(done)
			s.RunGC(ctx, time.Hour)
		}()
		reading, err := s.Get(ctx, d)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(reading)
		ext.put(b)
		synctest.Wait()
		if n, _ := s.Usage(); n != 1 {
			t.Fatalf("a copy being read was dropped")
		}
		reading.Close()
		time.Sleep(shadowRetry)
		synctest.Wait()
		if n, _ := s.Usage(); n != 0 {
			t.Fatalf("the copy was kept %v after its reader closed", shadowRetry)
		}
		cancel()
		<-done
	})
}

// A commit of a blob the external store already holds drops this store's
// copy at once: the external store's change came before the commit (a
// client reads the last byte before the commit syncs) and none follows.
func TestRunGCDropsCopyCommittedAfterExternal(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ext := newMemExternal()
		s := newStore(t, t.TempDir(), Options{External: ext})
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() {
			defer close(done)
			s.RunGC(ctx, time.Hour)
		}()
		defer func() { cancel(); <-done }()
		b, d := randBlob(t, 4096)
		p, err := s.Ingest(ctx, d, piece.PlanFor(int64(len(b))))
		if err != nil {
			t.Fatal(err)
		}
		fill(t, p, b)
		ext.put(b)
		synctest.Wait() // RunGC saw the change with nothing of its own to drop
		if err := p.Commit(d); err != nil {
			t.Fatal(err)
		}
		p.Close()
		synctest.Wait()
		if n, _ := s.Usage(); n != 0 {
			t.Fatalf("%d blobs of this store's kept after the commit of one the external store holds", n)
		}
	})
}
