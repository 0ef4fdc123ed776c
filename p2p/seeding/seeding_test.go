package seeding

import (
	"slices"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

func TestBegin(t *testing.T) {
	d := digest.FromString("blob")
	all := Offer{All: true}
	only := func(set ...int) Offer {
		held := make([]bool, 4)
		for _, s := range set {
			held[s] = true
		}
		return Offer{Held: held}
	}
	type step struct {
		piece, uploads int
		held           Offer
		want           bool
		undo           bool // take the copy back afterwards
	}
	// Steps at a node reading from the upstream unless relay.
	for _, tc := range []struct {
		name  string
		relay bool
		steps []step
	}{
		{"first copies always go", false, []step{{0, 9, all, true, false}, {1, 9, all, true, false}, {2, 9, all, true, false}}},
		{"duplicate refused while busy with unsent pieces", false, []step{{0, 0, all, true, false}, {0, 2, all, false, false}}},
		{"duplicate sent when upload is idle", false, []step{{0, 0, all, true, false}, {0, 1, all, true, false}}},
		{"duplicate sent when nothing new is held", false, []step{{0, 0, only(0, 1), true, false}, {1, 0, only(0, 1), true, false}, {0, 5, only(0, 1), true, false}}},
		{"unheld pieces do not count as unsent", false, []step{{0, 0, only(0), true, false}, {0, 5, only(0), true, false}}},
		{"a failed upload gives the piece back", false, []step{{0, 0, all, true, true}, {0, 5, all, true, false}, {0, 5, all, false, false}}},
		{"out of range is left to the caller", false, []step{{7, 5, all, true, false}, {7, 5, all, true, false}}},
		{"a relay sends duplicates below its own limit", true, []step{{0, 0, all, true, false}, {0, 2, all, true, false}, {0, 3, all, true, false}}},
		{"a relay refuses duplicates from its own limit", true, []step{{0, 0, all, true, false}, {0, 4, all, false, false}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := New(Options{})
			for k, s := range tc.steps {
				undo, _, ok := l.Begin(d, s.piece, 4, s.held, !tc.relay, s.uploads)
				if ok != s.want {
					t.Fatalf("step %d (piece %d, %d uploads): ok %v, want %v", k, s.piece, s.uploads, ok, s.want)
				}
				if ok && s.undo {
					undo()
					undo() // twice is once
				}
			}
		})
	}
}

func TestBlobsAreSeparate(t *testing.T) {
	l := New(Options{Blobs: 1})
	all := Offer{All: true}
	a, b := digest.FromString("a"), digest.FromString("b")
	if _, _, ok := l.Begin(a, 0, 2, all, true, 0); !ok {
		t.Fatal("first copy of a refused")
	}
	if _, _, ok := l.Begin(b, 0, 2, all, true, 5); !ok {
		t.Fatal("first copy of b refused after a copy of a")
	}
	// a was evicted (one blob kept): its count starts over.
	if _, _, ok := l.Begin(a, 0, 2, all, true, 5); !ok {
		t.Fatal("evicted blob still counted")
	}
}

func TestRespread(t *testing.T) {
	now := time.Unix(100, 0)
	l := New(Options{Respread: 2 * time.Second, Now: func() time.Time { return now }})
	d := digest.FromString("blob")
	all := Offer{All: true}
	if _, _, ok := l.Begin(d, 0, 4, all, true, 5); !ok {
		t.Fatal("first copy refused")
	}
	now = now.Add(time.Second)
	if _, _, ok := l.Begin(d, 0, 4, all, true, 5); ok {
		t.Fatal("duplicate sent one second after the first copy")
	}
	now = now.Add(1500 * time.Millisecond)
	if _, _, ok := l.Begin(d, 0, 4, all, true, 5); !ok {
		t.Fatal("duplicate refused 2.5 s after the first copy: a slow receiver would hold the piece back")
	}
	// The new copy restarts the wait.
	now = now.Add(time.Second)
	if _, _, ok := l.Begin(d, 0, 4, all, true, 5); ok {
		t.Fatal("third copy sent one second after the second")
	}
}

// TestFresh: a refusal names the pieces the parent would send instead.
func TestFresh(t *testing.T) {
	now := time.Unix(100, 0)
	l := New(Options{Respread: 2 * time.Second, Now: func() time.Time { return now }})
	d := digest.FromString("blob")
	held := Offer{Held: []bool{true, true, true, true, false}} // 4 not here yet
	for _, i := range []int{0, 1} {
		if _, _, ok := l.Begin(d, i, 5, held, true, 0); !ok {
			t.Fatalf("first copy of %d refused", i)
		}
	}
	now = now.Add(3 * time.Second) // piece 0's copy left long ago
	if _, _, ok := l.Begin(d, 1, 5, held, true, 0); !ok {
		t.Fatal("idle parent refused a duplicate")
	}
	_, fresh, ok := l.Begin(d, 1, 5, held, true, 5)
	if ok {
		t.Fatal("busy parent sent a duplicate while holding unsent pieces")
	}
	// 0 went out long ago, 1 just now, 2 and 3 never, 4 is not held.
	if want := []bool{true, false, true, true, false}; !slices.Equal(fresh, want) {
		t.Fatalf("fresh %v, want %v", fresh, want)
	}
}

// BenchmarkRefusal is a busy parent refusing a duplicate of a 3 GB blob's
// piece (716 pieces of 4 MiB) while half of its pieces went out lately:
// the refusal's cost is a scan of the blob's pieces.
func BenchmarkRefusal(b *testing.B) {
	const count = 716
	now := time.Unix(100, 0)
	l := New(Options{Respread: 2 * time.Second, Now: func() time.Time { return now }})
	d := digest.FromString("blob")
	all := Offer{All: true}
	for i := 0; i < count/2; i++ {
		if _, _, ok := l.Begin(d, i, count, all, true, 0); !ok {
			b.Fatal("first copy refused")
		}
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, fresh, ok := l.Begin(d, 0, count, all, true, 5); ok || !fresh[count-1] {
			b.Fatal("duplicate not refused")
		}
	}
}
