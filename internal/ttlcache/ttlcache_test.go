package ttlcache

import (
	"testing"
	"testing/synctest"
	"time"
)

func TestCache(t *testing.T) {
	// In a bubble: a goroutine left running would fail the test.
	synctest.Test(t, func(t *testing.T) {
		c := New[string, int](2, time.Minute)
		c.Add("a", 1)
		time.Sleep(30 * time.Second)
		c.Add("b", 2)
		for _, tc := range []struct {
			after time.Duration
			key   string
			want  int
			ok    bool
		}{
			{0, "a", 1, true},
			{29 * time.Second, "a", 1, true},
			{time.Second, "a", 0, false}, // a minute after it was added
			{0, "b", 2, true},
			{30 * time.Second, "b", 0, false},
		} {
			time.Sleep(tc.after)
			if got, ok := c.Get(tc.key); got != tc.want || ok != tc.ok {
				t.Fatalf("Get(%q) = %d, %v; want %d, %v", tc.key, got, ok, tc.want, tc.ok)
			}
			if c.Contains(tc.key) != tc.ok {
				t.Fatalf("Contains(%q) = %v", tc.key, !tc.ok)
			}
		}
		// Size bound: the least recently used goes.
		c.Add("x", 1)
		c.Add("y", 2)
		c.Get("x")
		c.Add("z", 3)
		if c.Contains("y") || !c.Contains("x") || !c.Contains("z") {
			t.Fatal("not the least recently used evicted")
		}
		c.Remove("x")
		if c.Contains("x") {
			t.Fatal("removed entry still there")
		}
	})
}
