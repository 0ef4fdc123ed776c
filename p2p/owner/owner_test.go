package owner

import (
	"fmt"
	"slices"
	"testing"
)

func TestRank(t *testing.T) {
	members := []string{"a", "b", "c", "d", "e"}
	counts := map[string]int{}
	moved := 0
	for k := 0; k < 5000; k++ {
		key := fmt.Sprintf("sha256:%d", k)
		r := Rank(key, members)
		if len(r) != len(members) {
			t.Fatal("rank lost members")
		}
		// Same order whatever the input order.
		rev := slices.Clone(members)
		slices.Reverse(rev)
		if !slices.Equal(Rank(key, rev), r) {
			t.Fatal("order depends on input order")
		}
		counts[r[0]]++
		if o, orev := Of(key, members), Of(key, rev); o != r[0] || orev != r[0] {
			t.Fatalf("%s: Of = %s (reversed %s), Rank's first %s", key, o, orev, r[0])
		}
		// Removing a non-owner never moves the key; removing the owner moves
		// it to the second in rank.
		without := slices.DeleteFunc(slices.Clone(members), func(m string) bool { return m == "c" })
		r2 := Rank(key, without)
		if r[0] != "c" && r2[0] != r[0] {
			moved++
		}
		if r[0] == "c" && r2[0] != r[1] {
			t.Fatalf("%s: owner c gone, next %s, want %s", key, r2[0], r[1])
		}
	}
	if moved != 0 {
		t.Fatalf("%d keys moved though their owner stayed", moved)
	}
	for m, n := range counts {
		if n < 800 || n > 1200 {
			t.Errorf("%s owns %d of 5000 keys; want about 1000", m, n)
		}
	}
	if Of("x", nil) != "" {
		t.Error("an owner among no members")
	}
	if Rank("x", nil) == nil || len(Rank("x", nil)) != 0 {
		t.Error("empty members")
	}
}

// BenchmarkRank and BenchmarkOf: a node's cost of finding a digest's owner
// among n members, at every refresh of every download.
func BenchmarkRank(b *testing.B) {
	for _, n := range []int{100, 2600} {
		ids := make([]string, n)
		for i := range ids {
			ids[i] = fmt.Sprint("node-", i)
		}
		b.Run(fmt.Sprint("members=", n), func(b *testing.B) {
			for b.Loop() {
				Rank("sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef", ids)
			}
		})
		b.Run(fmt.Sprint("of/members=", n), func(b *testing.B) {
			for b.Loop() {
				Of("sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef", ids)
			}
		})
	}
}
