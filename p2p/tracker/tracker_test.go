package tracker

import (
	"reflect"
	"testing"
	"time"
)

func TestPeers(t *testing.T) {
	t0 := time.Unix(1000, 0)
	tr := New()
	tr.Add("d", Peer{ID: "a", Addr: "A", Seen: t0})
	tr.Add("d", Peer{ID: "b", Addr: "B", Seen: t0.Add(time.Second)})
	tr.Add("d", Peer{ID: "c", Addr: "C", Seen: t0.Add(2 * time.Second)})
	tr.Add("other", Peer{ID: "x", Addr: "X", Seen: t0})
	tr.Add("d", Peer{ID: "a", Addr: "A2", Seen: t0.Add(3 * time.Second)}) // refresh

	ids := func(ps []Peer) (out []string) {
		for _, p := range ps {
			out = append(out, p.ID+"="+p.Addr)
		}
		return out
	}
	for _, tc := range []struct {
		except string
		max    int
		want   []string
	}{
		{"", 10, []string{"a=A2", "c=C", "b=B"}},
		{"c", 10, []string{"a=A2", "b=B"}},
		{"", 2, []string{"a=A2", "c=C"}},
		{"", 0, nil},
	} {
		if got := ids(tr.Peers("d", tc.except, tc.max)); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("Peers(d, %q, %d) = %v, want %v", tc.except, tc.max, got, tc.want)
		}
	}
	if got := tr.Peers("none", "", 5); len(got) != 0 {
		t.Errorf("unknown key: %v", got)
	}
}
