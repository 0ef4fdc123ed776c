package relay

import (
	"context"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// Every run's goroutines end before Run returns.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func loopback(n int) []Endpoint {
	eps := make([]Endpoint, n)
	for i := range eps {
		eps[i] = Endpoint{IP: "127.0.0.1", NS: Here{}}
	}
	return eps
}

// Every node gets every byte, on either schedule, with a last chunk shorter
// than the others and shares that do not divide evenly.
func TestEveryNodeGetsEverything(t *testing.T) {
	for _, tc := range []struct {
		name  string
		nodes int
		size  int64
		chunk int64
		sched Schedule
	}{
		{"split", 4, 3<<20 + 5, 0, Split},
		{"dealt", 4, 3<<20 + 5, 0, Dealt},
		{"split, fewer chunks than nodes", 5, 3 << 10, 1 << 10, Split},
		{"dealt, one node", 1, 1 << 20, 64 << 10, Dealt},
		{"split, one byte", 3, 1, 0, Split},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			res, err := Run(ctx, Endpoint{IP: "127.0.0.1", NS: Here{}}, loopback(tc.nodes), Options{Size: tc.size, Chunk: tc.chunk, Schedule: tc.sched})
			if err != nil {
				t.Fatal(err)
			}
			if len(res.Done) != tc.nodes {
				t.Fatalf("%d times, want %d", len(res.Done), tc.nodes)
			}
			for k, d := range res.Done {
				if d <= 0 || d > res.Max() {
					t.Errorf("node %d: done at %v (max %v)", k, d, res.Max())
				}
			}
		})
	}
}

func TestRefusals(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name  string
		nodes []Endpoint
		opts  Options
		want  string
	}{
		{"no nodes", nil, Options{Size: 1, Schedule: Split}, "no nodes"},
		{"nothing to send", loopback(2), Options{Schedule: Split}, "nothing to send"},
		{"unknown schedule", loopback(2), Options{Size: 1, Schedule: "best"}, "unknown schedule"},
		// An address not on this machine: nothing is sent anywhere.
		{"cannot listen", []Endpoint{{IP: "198.18.255.254", NS: Here{}}}, Options{Size: 1, Schedule: Split}, "listen on node 0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Run(ctx, Endpoint{IP: "127.0.0.1", NS: Here{}}, tc.nodes, tc.opts)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err %v, want %q", err, tc.want)
			}
		})
	}
}

// A run that cannot finish in time ends with an error, every goroutine
// stopped (Run waits for them).
func TestEndsWithItsContext(t *testing.T) {
	for _, sched := range []Schedule{Split, Dealt} {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if _, err := Run(ctx, Endpoint{IP: "127.0.0.1", NS: Here{}}, loopback(3), Options{Size: 1 << 40, Schedule: sched}); err == nil {
			t.Fatalf("%s: a cancelled run reported success", sched)
		}
		ctx, cancel = context.WithTimeout(context.Background(), 50*time.Millisecond)
		_, err := Run(ctx, Endpoint{IP: "127.0.0.1", NS: Here{}}, loopback(3), Options{Size: 1 << 40, Schedule: sched})
		cancel()
		if err == nil {
			t.Fatalf("%s: 1 TiB in 50 ms reported done", sched)
		}
	}
}
