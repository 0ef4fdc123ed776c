package swarm

import (
	"fmt"
	"maps"
	"slices"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/p2p/membership"

	"github.com/registry-proxy/registry-proxy/p2p/owner"
)

// fakeDownloads is the owner's download: pieces in flight, and what it left
// to delegates.
type fakeDownloads struct {
	fetching  []int
	delegated map[string][]int // by call, in order
	calls     int
}

func (f *fakeDownloads) Progress(digest.Digest) ([]int, bool, bool)  { return f.fetching, true, true }
func (f *fakeDownloads) FollowBack(digest.Digest, membership.Member) {}
func (f *fakeDownloads) Delegate(_ digest.Digest, pieces []int, _ string) {
	f.calls++
	if f.delegated == nil {
		f.delegated = map[string][]int{}
	}
	f.delegated[string(rune('0'+f.calls))] = pieces
}

func ints(v []uint32) []int {
	out := make([]int, len(v))
	for k, x := range v {
		out[k] = int(x)
	}
	return out
}

func TestDelegations(t *testing.T) {
	d := digest.FromString("blob")
	const count = 12
	fast := func() map[string]float64 {
		return map[string]float64{"a": 30e6, "b": 30e6, "c": 60e6, "slow": 4e6, "unknown": 0}
	}
	t.Run("a slow owner splits the pieces it has not started among the fast members", func(t *testing.T) {
		ds := &Delegations{Readers: 8}
		dl := &fakeDownloads{fetching: []int{1}}
		done := make([]bool, count)
		done[0] = true
		got := map[string][]int{}
		for _, node := range []string{"c", "slow", "a", "b"} {
			got[node] = ints(ds.Register(dl, d, done, node, 3e6, fast))
		}
		if len(got["slow"]) != 0 {
			t.Errorf("a member under half the fastest upload got %v", got["slow"])
		}
		// 10 free pieces (0 done, 1 in flight), by upload 30:30:60.
		if len(got["a"]) != 2 && len(got["a"]) != 3 || len(got["b"]) != 2 && len(got["b"]) != 3 || len(got["c"]) != 5 {
			t.Errorf("shares a %v, b %v, c %v; want about 2.5, 2.5, 5", got["a"], got["b"], got["c"])
		}
		var all []int
		for _, p := range got {
			all = append(all, p...)
		}
		slices.Sort(all)
		if want := []int{2, 3, 4, 5, 6, 7, 8, 9, 10, 11}; !slices.Equal(all, want) {
			t.Errorf("delegated %v, want every free piece once: %v", all, want)
		}
		if dl.calls != 3 {
			t.Errorf("the owner's download was told %d times, want once per delegate", dl.calls)
		}
		claimants := ds.Claimants(d)
		slices.Sort(claimants)
		if want := []string{"a", "b", "c"}; !slices.Equal(claimants, want) {
			t.Errorf("claimants %v, want %v (the members with a share)", claimants, want)
		}
		// Registering again: the same pieces, the download not told again.
		if again := ints(ds.Register(dl, d, done, "c", 3e6, fast)); !slices.Equal(again, got["c"]) || dl.calls != 3 {
			t.Errorf("c again: %v (first %v), %d calls", again, got["c"], dl.calls)
		}
	})
	t.Run("a share claimed late leaves what the owner started since", func(t *testing.T) {
		ds := &Delegations{Readers: 8}
		dl := &fakeDownloads{}
		done := make([]bool, count)
		first := ints(ds.Register(dl, d, done, "c", 3e6, fast))
		planned := len(first)
		for i := range done {
			done[i] = !slices.Contains(first, i) // the owner did everything else meanwhile
		}
		if late := ds.Register(dl, d, done, "a", 3e6, fast); len(late) != 0 {
			t.Errorf("a claimed %v after the owner had started them all (c had %d)", late, planned)
		}
	})
	t.Run("no delegation", func(t *testing.T) {
		for _, tc := range []struct {
			name    string
			ownerUp float64
			node    string
		}{
			{"the node's upload is under half the fastest", 20e6, "slow"},
			{"the owner's upload is unknown", 0, "c"},
			{"the node's upload is unknown", 3e6, "unknown"},
			{"the node is not in the membership's uploads", 3e6, "stranger"},
		} {
			ds := &Delegations{Readers: 8}
			dl := &fakeDownloads{}
			if got := ds.Register(dl, d, make([]bool, count), tc.node, tc.ownerUp, fast); len(got) != 0 || dl.calls != 0 {
				t.Errorf("%s: delegated %v", tc.name, got)
			}
		}
	})
	t.Run("equal links: the owner and the first readers in rendezvous order share the blob", func(t *testing.T) {
		equal := func() map[string]float64 {
			return map[string]float64{"a": 25e6, "b": 25e6, "c": 25e6, "d": 25e6}
		}
		ids := owner.Rank(d.String(), []string{"a", "b", "c", "d"})
		for _, tc := range []struct {
			readers int
			want    int // pieces each delegate gets of count
		}{{1, 0}, {2, count / 2}, {3, count / 3}} {
			ds := &Delegations{Readers: tc.readers}
			dl := &fakeDownloads{}
			done := make([]bool, count)
			var delegated []int
			for k, node := range ids {
				got := ints(ds.Register(dl, d, done, node, 25e6, equal))
				want := 0
				if k < tc.readers-1 {
					want = tc.want
				}
				if len(got) != want {
					t.Errorf("readers %d: %s (rank %d) got %v, want %d pieces", tc.readers, node, k, got, want)
				}
				delegated = append(delegated, got...)
			}
			// The owner keeps its share: the first free piece and every
			// readers-th after it.
			for i := 0; i < count; i += tc.readers {
				if slices.Contains(delegated, i) {
					t.Errorf("readers %d: the owner's piece %d delegated", tc.readers, i)
				}
			}
			if len(delegated) != count-(count+tc.readers-1)/tc.readers {
				t.Errorf("readers %d: delegated %v", tc.readers, delegated)
			}
		}
	})
}

// TestReadersKeptBeforePlan: until a reader registers, the owner chooses
// the readers once a second, not at every registration, and sees a member
// that became fit to read after that second.
func TestReadersKeptBeforePlan(t *testing.T) {
	d := digest.FromString("blob")
	now := time.Unix(100, 0)
	calls := 0
	ups := map[string]float64{"a": 30e6, "b": 3e6}
	uploads := func() map[string]float64 { calls++; return maps.Clone(ups) }
	ds := &Delegations{Readers: 8, Now: func() time.Time { return now }}
	dl := &fakeDownloads{}
	done := make([]bool, 12)
	for range 5 {
		if p := ds.Register(dl, d, done, "b", 3e6, uploads); len(p) != 0 {
			t.Fatalf("b, under half the fastest upload, got %v", p)
		}
	}
	if calls != 1 {
		t.Fatalf("the members' uploads read %d times for five registrations within a second, want once", calls)
	}
	ups["b"] = 30e6 // b's state now says it is fast
	if p := ds.Register(dl, d, done, "b", 3e6, uploads); len(p) != 0 {
		t.Fatalf("b got %v before the reader set was chosen again", p)
	}
	now = now.Add(readersFor)
	if p := ds.Register(dl, d, done, "b", 3e6, uploads); len(p) == 0 || calls != 2 {
		t.Fatalf("after a second, fast b got %v (uploads read %d times), want a share", p, calls)
	}
	// The plan made, a's share is waiting for it without another look.
	if p := ds.Register(dl, d, done, "a", 3e6, uploads); len(p) == 0 || calls != 2 {
		t.Fatalf("a got %v (uploads read %d times), want its planned share", p, calls)
	}
}

// BenchmarkRegisterBeforePlan: the owner's cost of a registration by a node
// that is not among the readers while none of them has registered yet (the
// first moments of a pull by every node), at 2,600 members.
func BenchmarkRegisterBeforePlan(b *testing.B) {
	d := digest.FromString("blob")
	const members = 2600
	ids := make([]string, members)
	for k := range ids {
		ids[k] = fmt.Sprintf("node-%04d", k)
	}
	uploads := func() map[string]float64 {
		m := make(map[string]float64, members)
		for _, id := range ids {
			m[id] = 300e6
		}
		return m
	}
	readers := map[string]bool{}
	for _, id := range owner.Rank(d.String(), ids)[:3] {
		readers[id] = true
	}
	var node string
	for _, id := range ids {
		if !readers[id] {
			node = id
			break
		}
	}
	ds := &Delegations{}
	dl := &fakeDownloads{}
	done := make([]bool, 768)
	b.ReportAllocs()
	for b.Loop() {
		if p := ds.Register(dl, d, done, node, 300e6, uploads); len(p) != 0 {
			b.Fatalf("a node outside the readers got %d pieces", len(p))
		}
	}
}
