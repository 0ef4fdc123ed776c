package collector

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/p2p/pb"
	"github.com/registry-proxy/registry-proxy/piece"
)

// fakeJob is a blob in memory.
type fakeJob struct {
	plan piece.Plan
	data []byte

	mu     sync.Mutex
	done   []bool
	source []string
	next   int
	// checksumFails counts pieces refused by their expected checksum;
	// wrongBytes those that passed it with bytes not the blob's.
	checksumFails, wrongBytes int
}

func newJob(pieces int) *fakeJob {
	plan := piece.Plan{Size: int64(pieces) * 1024, PieceSize: 1024} // small: the collector takes any plan
	data := make([]byte, plan.Size)
	for i := range data {
		data[i] = byte(i * 7)
	}
	return &fakeJob{plan: plan, data: data, done: make([]bool, pieces), source: make([]string, pieces), next: -1}
}

func (j *fakeJob) Digest() digest.Digest { return digest.FromString("job") }
func (j *fakeJob) Plan() piece.Plan      { return j.plan }
func (j *fakeJob) Has(i int) bool        { j.mu.Lock(); defer j.mu.Unlock(); return j.done[i] }
func (j *fakeJob) Next() int             { j.mu.Lock(); defer j.mu.Unlock(); return j.next }

func (j *fakeJob) Put(i int, r io.Reader, source string, want Expect) error {
	b, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	off, n := j.plan.Range(i)
	if int64(len(b)) != n {
		return fmt.Errorf("piece %d: %d bytes", i, len(b))
	}
	if want.Known && piece.Checksum(b) != want.CRC {
		j.mu.Lock()
		j.checksumFails++
		j.mu.Unlock()
		return ErrChecksum
	}
	if !bytes.Equal(b, j.data[off:off+n]) {
		j.mu.Lock()
		j.wrongBytes++
		j.mu.Unlock()
		return errors.New("wrong bytes")
	}
	j.mu.Lock()
	j.done[i], j.source[i] = true, source
	j.mu.Unlock()
	return nil
}

func (j *fakeJob) from(src string) (n int) {
	j.mu.Lock()
	defer j.mu.Unlock()
	for _, s := range j.source {
		if s == src {
			n++
		}
	}
	return n
}

func (j *fakeJob) checksums(pieces ...int) []Held {
	var out []Held
	for _, i := range pieces {
		off, n := j.plan.Range(i)
		out = append(out, Held{Index: i, CRC: piece.Checksum(j.data[off : off+n])})
	}
	return out
}

func (j *fakeJob) all() []int {
	out := make([]int, len(j.done))
	for i := range out {
		out[i] = i
	}
	return out
}

// fakeParent serves the job's bytes.
type fakeParent struct {
	id      string
	job     *fakeJob
	fail    bool
	corrupt bool

	mu    sync.Mutex
	asked []int
}

func (p *fakeParent) ID() string { return p.id }

func (p *fakeParent) Fetch(_ context.Context, i int, off, n int64) (io.ReadCloser, error) {
	p.mu.Lock()
	p.asked = append(p.asked, i)
	p.mu.Unlock()
	if p.fail {
		return nil, errors.New("parent down")
	}
	b := append([]byte(nil), p.job.data[off:off+n]...)
	if p.corrupt {
		b[0] ^= 1
	}
	return io.NopCloser(bytes.NewReader(b)), nil
}

func (p *fakeParent) count() int { p.mu.Lock(); defer p.mu.Unlock(); return len(p.asked) }

type fixedClock struct{ t time.Time }

func (c *fixedClock) now() time.Time { return c.t }

func newCollector(selector string, states map[string]*pb.HostState) *Collector {
	clk := &fixedClock{t: time.Unix(1e9, 0)}
	return New(Options{
		Concurrency: 1,
		Selector:    selector,
		Now:         clk.now,
		Rand:        rand.New(rand.NewPCG(1, 2)),
		State: func(id string) (*pb.HostState, bool) {
			st, ok := states[id]
			return st, ok
		},
	})
}

func idle() *pb.HostState { return &pb.HostState{MaxTxBandwidth: 100e6, UploadLimit: 16} }
func loaded() *pb.HostState {
	return &pb.HostState{MaxTxBandwidth: 100e6, TxBandwidth: 99e6, UploadsInFlight: 16, UploadLimit: 16}
}

func run(t *testing.T, r *Run) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := r.Run(ctx); err != nil {
		t.Fatal(err)
	}
}

func TestWeight(t *testing.T) {
	tests := []struct {
		name string
		st   *pb.HostState
		ok   bool
		want float64
	}{
		{"unknown", nil, false, 125e6 / 20},
		{"idle", idle(), true, 100e6},
		{"half used", &pb.HostState{MaxTxBandwidth: 100e6, TxBandwidth: 50e6, UploadLimit: 16}, true, 50e6},
		{"saturated gets the floor", &pb.HostState{MaxTxBandwidth: 100e6, TxBandwidth: 100e6, UploadLimit: 16}, true, 5e6},
		{"uploads in flight", &pb.HostState{MaxTxBandwidth: 100e6, UploadsInFlight: 4, UploadLimit: 16}, true, 50e6},
		{"busy disk", &pb.HostState{MaxTxBandwidth: 100e6, DiskReadBandwidth: 90e6, UploadLimit: 16}, true, 50e6},
		{"no maximum known", &pb.HostState{UploadLimit: 16}, true, 125e6},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Weight(tt.st, tt.ok); got != tt.want {
				t.Fatalf("Weight = %g, want %g", got, tt.want)
			}
		})
	}
	if Weight(loaded(), true) <= 0 {
		t.Fatal("a loaded parent must keep a positive weight")
	}
}

// Parent "busy" announced every piece first and is loaded; "spare" is idle.
func TestLoadedParentGetsFewerPieces(t *testing.T) {
	states := map[string]*pb.HostState{"busy": loaded(), "spare": idle()}
	tests := []struct {
		selector       string
		minSpare, maxB int
	}{
		{SelectorState, 150, 40}, // weights 100e6 vs 1e6: the loaded parent gets ~1%
		{SelectorFCFS, 0, 200},   // FCFS: everything from the first announcer
	}
	for _, tt := range tests {
		t.Run(tt.selector, func(t *testing.T) {
			job := newJob(200)
			r := newCollector(tt.selector, states).NewRun(job)
			busy, spare := &fakeParent{id: "busy", job: job}, &fakeParent{id: "spare", job: job}
			r.AddParent(busy)
			r.AddParent(spare)
			r.Announce("busy", job.checksums(job.all()...), nil)
			r.Announce("spare", job.checksums(job.all()...), nil)
			run(t, r)
			if s, b := job.from("spare"), job.from("busy"); s < tt.minSpare || b > tt.maxB || s+b != 200 {
				t.Fatalf("spare %d, busy %d", s, b)
			}
			if tt.selector == SelectorFCFS && job.from("busy") != 200 {
				t.Fatalf("fcfs: busy %d, want all 200", job.from("busy"))
			}
		})
	}
}

func TestEmptyQueueFallsThrough(t *testing.T) {
	job := newJob(20)
	r := newCollector(SelectorState, map[string]*pb.HostState{"a": idle(), "b": loaded()}).NewRun(job)
	a, b := &fakeParent{id: "a", job: job}, &fakeParent{id: "b", job: job}
	r.AddParent(a)
	r.AddParent(b)
	r.Announce("a", job.checksums(0, 1), nil) // favoured, but has two pieces
	r.Announce("b", job.checksums(job.all()...), nil)
	run(t, r)
	if job.from("a") > 2 || job.from("b") < 18 {
		t.Fatalf("a %d, b %d", job.from("a"), job.from("b"))
	}
}

func TestFinishedPiecesSkipped(t *testing.T) {
	job := newJob(10)
	for i := 0; i < 10; i += 2 {
		job.done[i] = true
	}
	r := newCollector(SelectorState, nil).NewRun(job)
	p := &fakeParent{id: "p", job: job}
	r.AddParent(p)
	r.Announce("p", job.checksums(job.all()...), nil)
	run(t, r)
	for _, i := range p.asked {
		if i%2 == 0 {
			t.Fatalf("asked for finished piece %d (asked %v)", i, p.asked)
		}
	}
	if len(p.asked) != 5 {
		t.Fatalf("asked %v", p.asked)
	}
}

func TestBlockedParentGetsNone(t *testing.T) {
	tests := []struct {
		name string
		bad  func(*fakeParent)
	}{
		{"fails", func(p *fakeParent) { p.fail = true }},
		{"sends bad bytes", func(p *fakeParent) { p.corrupt = true }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			job := newJob(30)
			// The bad parent looks far better, so it is chosen first.
			r := newCollector(SelectorState, map[string]*pb.HostState{"bad": idle(), "good": loaded()}).NewRun(job)
			bad, good := &fakeParent{id: "bad", job: job}, &fakeParent{id: "good", job: job}
			tt.bad(bad)
			r.AddParent(bad)
			r.AddParent(good)
			r.Announce("bad", job.checksums(job.all()...), nil)
			r.Announce("good", job.checksums(job.all()...), nil)
			run(t, r)
			if n := bad.count(); n != 1 {
				t.Fatalf("blocked parent asked %d times, want exactly once", n)
			}
			if job.from("good") != 30 {
				t.Fatalf("good sent %d", job.from("good"))
			}
		})
	}
}

func TestUpstreamIsLastResort(t *testing.T) {
	job := newJob(12)
	c := newCollector(SelectorState, nil)
	r := c.NewRun(job)
	up := &fakeParent{id: UpstreamID, job: job}
	peer := &fakeParent{id: "peer", job: job}
	r.SetUpstream(up, true)
	r.AddParent(peer)
	r.Announce("peer", job.checksums(0, 1, 2, 3, 4, 5), nil)
	run(t, r)
	if job.from("peer") != 6 || job.from(UpstreamID) != 6 {
		t.Fatalf("peer %d, upstream %d: want the peer's six from the peer", job.from("peer"), job.from(UpstreamID))
	}
}

func TestUpstreamWaitsUntilAllowed(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		job := newJob(4)
		r := newCollector(SelectorState, nil).NewRun(job)
		up := &fakeParent{id: UpstreamID, job: job}
		r.SetUpstream(up, false)
		r.AddParent(&fakeParent{id: "empty", job: job})
		errc := make(chan error, 1)
		go func() { errc <- r.Run(t.Context()) }()
		synctest.Wait() // every worker idle
		if up.count() != 0 {
			t.Fatal("upstream used before it was allowed")
		}
		r.AllowUpstream(true)
		if err := <-errc; err != nil || job.from(UpstreamID) != 4 {
			t.Fatalf("err %v, upstream %d", err, job.from(UpstreamID))
		}
	})
}

func TestBestPiece(t *testing.T) {
	job := newJob(6)
	job.next = 0 // the reader is at piece 0; 0 and 1 are urgent
	r := newCollector(SelectorState, nil).NewRun(job)
	for _, id := range []string{"owner", "b", "c"} {
		r.AddParent(&fakeParent{id: id, job: job})
	}
	r.Announce("owner", job.checksums(0, 1, 2, 3, 4, 5), nil)
	r.Announce("b", nil, []int{0}) // b is fetching piece 0
	r.Announce("c", job.checksums(1, 5), []int{2})
	owner := r.parents["owner"]
	now := time.Now()
	for _, tc := range []struct {
		name  string
		setup func()
		at    time.Time
		want  int
	}{
		{"urgent first, of them the one nobody fetches", func() {}, now, 1},
		{"beyond the urgent ones: unfetched, rarest, nearest", func() { r.setWantedLocked(0, false); r.setWantedLocked(1, false) }, now, 3},
		{"a refused piece is skipped", func() { r.refuse(owner, 3, now.Add(time.Second)) }, now, 4},
		{"until the refusal expires", func() {}, now.Add(2 * time.Second), 3},
		{"rare beats near", func() { r.Announce("b", job.checksums(3), nil) }, now.Add(2 * time.Second), 4},
		{"fewest fetchers beat rarity", func() { r.Announce("c", nil, []int{2, 4}) }, now.Add(2 * time.Second), 3},
	} {
		tc.setup()
		if got := r.bestPiece(owner, r.cursor(), tc.at, false); got != tc.want {
			t.Errorf("%s: piece %d, want %d", tc.name, got, tc.want)
		}
	}
}

// TestDryParent: a parent whose wanted pieces are all refused is passed
// over until the first refusal ends, or it has another wanted piece.
func TestDryParent(t *testing.T) {
	job := newJob(6)
	job.next = 0
	r := newCollector(SelectorState, nil).NewRun(job)
	r.AddParent(&fakeParent{id: "p", job: job})
	r.Announce("p", job.checksums(0, 1), nil)
	p := r.parents["p"]
	now := r.epoch.Add(time.Minute)
	r.refuse(p, 0, now.Add(2*time.Second))
	r.refuse(p, 1, now.Add(time.Second+time.Microsecond)) // rounded up to the next millisecond
	for _, tc := range []struct {
		name  string
		setup func()
		at    time.Time
		want  int // bestPiece
		dry   bool
	}{
		{"every piece refused: dry", func() {}, now, -1, true},
		{"still dry before the first refusal ends", func() {}, now.Add(time.Second), -1, true},
		{"the first refusal ended", func() {}, now.Add(time.Second + time.Millisecond), 1, false},
		{"refused again: dry", func() { r.refuse(p, 1, now.Add(time.Hour)) }, now.Add(time.Second + time.Millisecond), -1, true},
		{"a piece it did not have is announced", func() { r.Announce("p", job.checksums(4), nil) }, now.Add(time.Second + time.Millisecond), 4, false},
		{"refused again: dry", func() { r.refuse(p, 4, now.Add(time.Hour)) }, now.Add(time.Second + time.Millisecond), -1, true},
		{"a piece it has is wanted again", func() {
			r.setWantedLocked(5, false)
			r.Announce("p", job.checksums(5), nil)
			r.setWantedLocked(5, true)
		}, now.Add(time.Second + time.Millisecond), 5, false},
	} {
		tc.setup()
		if got := r.bestPiece(p, r.cursor(), tc.at, false); got != tc.want {
			t.Errorf("%s: piece %d, want %d", tc.name, got, tc.want)
		}
		if dry := tc.at.Before(p.dry); dry != tc.dry {
			t.Errorf("%s: dry %v (until %v), want %v", tc.name, dry, p.dry.Sub(now), tc.dry)
		}
		// A pick passes a dry parent over.
		if i, pq, _ := (statePolicy{}).pick(r, tc.at); (pq == nil) != tc.dry {
			t.Errorf("%s: picked piece %d from %v", tc.name, i, pq != nil)
		}
	}
}

func TestReaderWindowFirst(t *testing.T) {
	job := newJob(100)
	job.next = 60
	r := newCollector(SelectorState, nil).NewRun(job)
	p := &fakeParent{id: "p", job: job}
	r.AddParent(p)
	r.Announce("p", job.checksums(job.all()...), nil)
	run(t, r)
	if p.asked[0] < 60 || p.asked[0] >= 60+r.c.opts.Urgent {
		t.Fatalf("first piece %d, want within the window from 60", p.asked[0])
	}
}

func TestStalledPeersFallBackToUpstream(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		job := newJob(3)
		clk := &fixedClock{t: time.Unix(1e9, 0)}
		c := New(Options{Concurrency: 1, Now: func() time.Time { return clk.t }, Rand: rand.New(rand.NewPCG(1, 2)), StallTimeout: time.Minute, BlockFor: time.Hour})
		r := c.NewRun(job)
		up := &fakeParent{id: UpstreamID, job: job}
		r.SetUpstream(up, false) // not the owner
		bad := &fakeParent{id: "owner", job: job, corrupt: true}
		r.AddParent(bad)
		r.Announce("owner", job.checksums(job.all()...), nil)
		errc := make(chan error, 1)
		go func() { errc <- r.Run(t.Context()) }()
		// The owner's first piece fails its checksum and the owner is
		// blocked; nothing else may send until the stall timeout passes
		// (on the run's clock, which stands still here).
		synctest.Wait()
		if up.count() != 0 || bad.count() != 1 {
			t.Fatalf("upstream asked %d, owner %d times before the stall timeout", up.count(), bad.count())
		}
		r.mu.Lock()
		clk.t = clk.t.Add(2 * time.Minute)
		r.broadcastLocked()
		r.mu.Unlock()
		if err := <-errc; err != nil || job.from(UpstreamID) != 3 {
			t.Fatalf("err %v, upstream sent %d", err, job.from(UpstreamID))
		}
	})
}

// busyParent answers ErrBusy a few times, as a parent at its upload limit.
type busyParent struct {
	fakeParent
	busy int
}

func (b *busyParent) Fetch(ctx context.Context, i int, off, n int64) (io.ReadCloser, error) {
	b.mu.Lock()
	if b.busy > 0 {
		b.busy--
		b.mu.Unlock()
		return nil, ErrBusy
	}
	b.mu.Unlock()
	return b.fakeParent.Fetch(ctx, i, off, n)
}

func TestBusyParentBacksOffBriefly(t *testing.T) {
	job := newJob(6)
	c := New(Options{Concurrency: 4, PerParent: 2, StallTimeout: time.Hour})
	r := c.NewRun(job)
	p := &busyParent{fakeParent: fakeParent{id: "owner", job: job}, busy: 3}
	r.AddParent(p)
	r.SetUpstream(&fakeParent{id: UpstreamID, job: job}, false)
	r.Announce("owner", job.checksums(job.all()...), nil)
	start := time.Now()
	run(t, r)
	if job.from("owner") != 6 {
		t.Fatalf("owner sent %d of 6", job.from("owner"))
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("took %v: a busy parent was blocked like a failed one", d)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.parents["owner"].inflight != 0 {
		t.Fatalf("in-flight count %d after the run", r.parents["owner"].inflight)
	}
}

// TestPerParentLimit checks that one parent is asked for at most PerParent
// pieces at once, and that InFlight names them while they are fetched.
func TestPerParentLimit(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		job := newJob(20)
		c := New(Options{Concurrency: 8, PerParent: 2})
		r := c.NewRun(job)
		gate := make(chan struct{})
		p := &gatedParent{fakeParent: fakeParent{id: "p", job: job}, gate: gate}
		r.AddParent(p)
		r.Announce("p", job.checksums(job.all()...), nil)
		errc := make(chan error, 1)
		go func() { errc <- r.Run(t.Context()) }()
		synctest.Wait()
		if n := p.count(); n != 2 {
			t.Fatalf("%d pieces asked of one parent at once, want 2", n)
		}
		p.mu.Lock()
		asked := slices.Sorted(slices.Values(p.asked))
		p.mu.Unlock()
		if got := r.InFlight(); !slices.Equal(got, asked) {
			t.Fatalf("in flight %v, asked %v", got, asked)
		}
		close(gate)
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
		if got := r.InFlight(); got != nil {
			t.Fatalf("in flight after the run: %v", got)
		}
	})
}

type gatedParent struct {
	fakeParent
	gate chan struct{}
}

func (g *gatedParent) Fetch(ctx context.Context, i int, off, n int64) (io.ReadCloser, error) {
	rc, err := g.fakeParent.Fetch(ctx, i, off, n)
	<-g.gate
	return rc, err
}

// elsewhereParent refuses every piece: it sent each one to another node.
type elsewhereParent struct{ fakeParent }

func (p *elsewhereParent) Fetch(ctx context.Context, i int, off, n int64) (io.ReadCloser, error) {
	p.fakeParent.Fetch(ctx, i, off, n) // counts the ask
	return nil, ErrElsewhere
}

func TestElsewhereIsNotAFailure(t *testing.T) {
	for _, sel := range []string{SelectorState, SelectorFCFS} {
		t.Run(sel, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				job := newJob(8)
				c := New(Options{Concurrency: 2, Selector: sel, Rand: rand.New(rand.NewPCG(1, 2))})
				r := c.NewRun(job)
				owner := &elsewhereParent{fakeParent{id: "owner", job: job}}
				sib := &fakeParent{id: "sibling", job: job}
				r.AddParent(owner)
				r.AddParent(sib)
				r.SetUpstream(&fakeParent{id: UpstreamID, job: job}, false)
				all := job.checksums(0, 1, 2, 3, 4, 5, 6, 7)
				r.Announce("owner", all, nil) // the owner announces first: FCFS asks it first
				r.Announce("sibling", all, nil)
				start := time.Now()
				if err := r.Run(context.Background()); err != nil {
					t.Fatal(err)
				}
				if got := job.from("sibling"); got != 8 {
					t.Errorf("%d pieces from the sibling, want 8", got)
				}
				if owner.count() == 0 {
					t.Error("the owner was never asked")
				}
				// A blocked owner would not matter here, but a failure would have
				// logged and waited; a refusal costs no time at all.
				if d := time.Since(start); d > time.Second {
					t.Errorf("took %v", d)
				}
			})
		})
	}
}

// offeringParent sends only the pieces it offers, and says which in each
// refusal, as a busy super-seeding peer does.
type offeringParent struct {
	fakeParent
	offered []bool
}

func (p *offeringParent) Fetch(ctx context.Context, i int, off, n int64) (io.ReadCloser, error) {
	rc, err := p.fakeParent.Fetch(ctx, i, off, n) // counts the ask
	if !p.offered[i] {
		return nil, &ElsewhereError{Offered: piece.EncodeSet(p.offered)}
	}
	return rc, err
}

// TestRefusalWithOffer: one refusal that names what the parent would send
// keeps the run from asking it for the other pieces it would refuse, one
// round trip each, and a malformed offer is only a refusal.
func TestRefusalWithOffer(t *testing.T) {
	for _, tc := range []struct {
		name        string
		bad         bool
		maxRefusals int
	}{
		{"offer", false, 1},
		{"malformed offer", true, 8},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				job := newJob(8)
				c := New(Options{Concurrency: 1, Rand: rand.New(rand.NewPCG(1, 2))})
				r := c.NewRun(job)
				offered := []bool{false, false, false, false, false, false, true, true}
				if tc.bad {
					offered = offered[:3] // another blob's set
				}
				owner := &offeringParent{fakeParent{id: "owner", job: job}, offered}
				sib := &fakeParent{id: "sibling", job: job}
				r.AddParent(owner)
				r.AddParent(sib)
				all := job.checksums(0, 1, 2, 3, 4, 5, 6, 7)
				r.Announce("owner", all, nil)
				r.Announce("sibling", all, nil)
				if err := r.Run(context.Background()); err != nil {
					t.Fatal(err)
				}
				owner.mu.Lock()
				defer owner.mu.Unlock()
				refusals := 0
				for _, i := range owner.asked {
					if i < 6 {
						refusals++
					}
				}
				if refusals == 0 || refusals > tc.maxRefusals {
					t.Errorf("asked for pieces it would not send %d times (%v), want 1..%d", refusals, owner.asked, tc.maxRefusals)
				}
			})
		})
	}
}

// slowParent sends ten bytes per 100 ms until its request is cancelled.
type slowParent struct{ fakeParent }

type slowBody struct {
	ctx  context.Context
	data []byte
}

func (b *slowBody) Read(p []byte) (int, error) {
	if len(b.data) == 0 {
		return 0, io.EOF
	}
	select {
	case <-b.ctx.Done():
		return 0, b.ctx.Err()
	case <-time.After(100 * time.Millisecond):
	}
	n := copy(p[:min(len(p), 10)], b.data)
	b.data = b.data[n:]
	return n, nil
}
func (b *slowBody) Close() error { return nil }

func (p *slowParent) Fetch(ctx context.Context, i int, off, n int64) (io.ReadCloser, error) {
	p.fakeParent.Fetch(ctx, i, off, n)
	return &slowBody{ctx: ctx, data: append([]byte(nil), p.job.data[off:off+n]...)}, nil
}

func TestSlowPieceMovesToFasterParent(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		job := newJob(2) // pieces of 1024 bytes: ten seconds each from the slow parent
		states := map[string]*pb.HostState{
			"slow": {MaxTxBandwidth: 1000, TxBandwidth: 900, UploadLimit: 16},
			"fast": idle(),
		}
		c := New(Options{Concurrency: 2, Rand: rand.New(rand.NewPCG(1, 2)), State: func(id string) (*pb.HostState, bool) {
			st, ok := states[id]
			return st, ok
		}})
		r := c.NewRun(job)
		slow := &slowParent{fakeParent{id: "slow", job: job}}
		fast := &fakeParent{id: "fast", job: job}
		r.AddParent(slow)
		r.AddParent(fast)
		r.SetUpstream(&fakeParent{id: UpstreamID, job: job}, false)
		r.Announce("slow", job.checksums(0), nil)
		r.Announce("fast", job.checksums(1), nil)
		go func() {
			time.Sleep(1500 * time.Millisecond)
			r.Announce("fast", job.checksums(0), nil)
		}()
		start := time.Now()
		if err := r.Run(context.Background()); err != nil {
			t.Fatal(err)
		}
		if job.from("fast") != 2 || slow.count() != 1 {
			t.Errorf("pieces from fast %d, slow asked %d times; want 2 and 1", job.from("fast"), slow.count())
		}
		if d := time.Since(start); d > 3*time.Second {
			t.Errorf("took %v: the slow fetch was not moved", d)
		}
	})
}

// Two parents that each look much faster than they send (both report
// themselves idle): a slow piece moves once, not back and forth from its
// first byte each time.
func TestSlowPieceMovesOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		job := newJob(3) // pieces of 1024 bytes: ten seconds each from either slow parent
		// Piece 2 comes from a quick parent; its worker then stays idle to
		// move slow pieces.
		c := New(Options{Concurrency: 3, PerParent: 2, Rand: rand.New(rand.NewPCG(1, 2)),
			State: func(string) (*pb.HostState, bool) { return idle(), true }})
		r := c.NewRun(job)
		a := &slowParent{fakeParent{id: "a", job: job}}
		b := &slowParent{fakeParent{id: "b", job: job}}
		r.AddParent(a)
		r.AddParent(b)
		r.AddParent(&fakeParent{id: "quick", job: job})
		r.SetUpstream(&fakeParent{id: UpstreamID, job: job}, false)
		r.Announce("a", job.checksums(0, 1), nil)
		r.Announce("b", job.checksums(0, 1), nil)
		r.Announce("quick", job.checksums(2), nil)
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := r.Run(ctx); err != nil {
			t.Fatalf("the pieces did not arrive within a minute: %v (asked a %d, b %d times)", err, a.count(), b.count())
		}
		if n := a.count() + b.count(); n != 4 {
			t.Errorf("asked %d times (a %d, b %d), want 4: each piece from one parent, then once from the other", n, a.count(), b.count())
		}
	})
}

// A cancelled run returns, and no worker keeps asking parents: their
// fetches fail at once on a cancelled context.
func TestCancelledRunStops(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		job := newJob(64)
		c := New(Options{Concurrency: 4, Rand: rand.New(rand.NewPCG(1, 2))})
		r := c.NewRun(job)
		p := &slowParent{fakeParent{id: "slow", job: job}}
		r.AddParent(p)
		r.SetUpstream(&fakeParent{id: UpstreamID, job: job}, false)
		r.Announce("slow", job.checksums(job.all()...), nil)
		ctx, cancel := context.WithCancel(context.Background())
		errc := make(chan error, 1)
		go func() { errc <- r.Run(ctx) }()
		time.Sleep(time.Second)
		cancel()
		synctest.Wait()
		select {
		case <-errc:
		default:
			t.Fatal("Run did not return after its context ended")
		}
		asked := p.count()
		time.Sleep(time.Second)
		if p.count() != asked {
			t.Errorf("parent asked %d more times after the run ended", p.count()-asked)
		}
	})
}

// A parent that trickles bytes while reporting itself idle (the favourite by
// its own report) loses its piece within a rate window and is blocked; the
// honest parent sends the rest.
func TestTricklingParentLosesPiece(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		job := newJob(4) // 1024-byte pieces: about ten seconds each from the trickler
		states := map[string]*pb.HostState{
			"trickler": idle(),
			"honest":   {MaxTxBandwidth: 1000, TxBandwidth: 990, UploadLimit: 16}, // looks too busy to steal to
		}
		c := New(Options{Concurrency: 2, PerParent: 1, MinRate: 500, RateWindow: time.Second, Rand: rand.New(rand.NewPCG(1, 2)),
			State: func(id string) (*pb.HostState, bool) { st, ok := states[id]; return st, ok }})
		r := c.NewRun(job)
		trickler := &slowParent{fakeParent{id: "trickler", job: job}}
		honest := &fakeParent{id: "honest", job: job}
		r.AddParent(trickler)
		r.AddParent(honest)
		r.SetUpstream(&fakeParent{id: UpstreamID, job: job}, false)
		all := job.checksums(job.all()...)
		r.Announce("trickler", all, nil)
		r.Announce("honest", all, nil)
		start := time.Now()
		if err := r.Run(context.Background()); err != nil {
			t.Fatal(err)
		}
		if got := job.from("trickler"); got != 0 {
			t.Errorf("%d pieces completed by the trickler", got)
		}
		if trickler.count() == 0 {
			t.Fatal("the trickler was never chosen: the test proves nothing")
		}
		if d := time.Since(start); d > 3*time.Second {
			t.Errorf("took %v: the trickler kept its piece", d)
		}
	})
}

// What a parent reports counts for at most measuredFactor times the rate
// its pieces came at.
func TestWeightCappedByMeasuredRate(t *testing.T) {
	c := New(Options{State: func(string) (*pb.HostState, bool) { return idle(), true }})
	r := c.NewRun(newJob(1))
	p := &fakeParent{id: "p"}
	r.AddParent(p)
	pq := r.parents["p"]
	if w := r.weightLocked(pq); w <= measuredFactor*1000 {
		t.Fatalf("unmeasured weight %v: the report should count", w)
	}
	pq.measured = 1000
	if w := r.weightLocked(pq); w != measuredFactor*1000 {
		t.Errorf("weight %v after measuring 1000 B/s, want %v", w, measuredFactor*1000)
	}
}

// The piece a reader waits on, coming slowly from a peer, is taken from the
// upstream after RaceAfter, though this node is not the one that goes
// upstream.
func TestReaderWaitRacesUpstream(t *testing.T) {
	for _, race := range []time.Duration{time.Second, 0} {
		t.Run(fmt.Sprint(race), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				job := newJob(1) // ten seconds from the slow parent
				job.next = 0     // a reader waits on it
				c := New(Options{Concurrency: 2, RaceAfter: race, Rand: rand.New(rand.NewPCG(1, 2))})
				r := c.NewRun(job)
				slow := &slowParent{fakeParent{id: "slow", job: job}}
				r.AddParent(slow)
				r.SetUpstream(&fakeParent{id: UpstreamID, job: job}, false)
				r.Announce("slow", job.checksums(0), nil)
				start := time.Now()
				if err := r.Run(context.Background()); err != nil {
					t.Fatal(err)
				}
				took := time.Since(start)
				if race > 0 && (job.from(UpstreamID) != 1 || took > 2*race) {
					t.Errorf("with RaceAfter %v: piece from the upstream %d times, took %v", race, job.from(UpstreamID), took)
				}
				if race == 0 && (job.from("slow") != 1 || took < 5*time.Second) {
					t.Errorf("without racing: the slow parent sent %d pieces in %v", job.from("slow"), took)
				}
			})
		})
	}
}

// A parent that lies consistently (wrong bytes, checksums of its wrong
// bytes) is caught piece by piece once the owner's checksums are known: its
// pieces fail against them, and it is blocked.
func TestPiecesCheckedAgainstAuthority(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		job := newJob(4)
		c := New(Options{Concurrency: 1, Rand: rand.New(rand.NewPCG(1, 2))})
		r := c.NewRun(job)
		liar := &fakeParent{id: "liar", job: job, corrupt: true}
		owner := &fakeParent{id: "owner", job: job}
		r.AddParent(liar)
		r.AddParent(owner)
		r.SetUpstream(&fakeParent{id: UpstreamID, job: job}, false)
		r.SetAuthority("owner")
		// The liar's checksums match its corrupt bytes.
		var lies []Held
		for i := range 4 {
			off, n := job.plan.Range(i)
			b := append([]byte(nil), job.data[off:off+n]...)
			b[0] ^= 1
			lies = append(lies, Held{Index: i, CRC: piece.Checksum(b)})
		}
		r.AnnounceComplete("liar", lies)
		r.Announce("owner", job.checksums(job.all()...), nil)
		if err := r.Run(context.Background()); err != nil {
			t.Fatal(err)
		}
		if job.from("liar") != 0 || job.from("owner") != 4 {
			t.Fatalf("pieces from liar %d, owner %d", job.from("liar"), job.from("owner"))
		}
		if liar.count() != 1 {
			t.Errorf("the liar was asked %d times; blocked after its first bad piece it should be asked once", liar.count())
		}
		if job.checksumFails != 1 || job.wrongBytes != 0 {
			t.Errorf("%d pieces refused by the owner's checksum, %d wrong pieces passed a checksum; want 1 and 0", job.checksumFails, job.wrongBytes)
		}
	})
}

// A delegate reads its granted pieces from the upstream even though the
// upstream is not its to use, and a peer that has every piece sends the
// rest.
func TestGrantedPiecesFromUpstream(t *testing.T) {
	job := newJob(8)
	r := newCollector(SelectorState, nil).NewRun(job)
	up := &fakeParent{id: UpstreamID, job: job}
	r.SetUpstream(up, false)
	r.AddParent(&fakeParent{id: "peer", job: job})
	r.Announce("peer", job.checksums(job.all()...), nil)
	r.GrantUpstream([]int{1, 5, 99}) // 99: not a piece, ignored
	run(t, r)
	for i, src := range job.source {
		want := "peer"
		if i == 1 || i == 5 {
			want = UpstreamID
		}
		if src != want {
			t.Errorf("piece %d from %s, want %s", i, src, want)
		}
	}
}

// The owner leaves denied pieces to its delegates: it reads the others
// from the upstream and takes the denied ones from the delegate once it
// announces them.
func TestDeniedPiecesWaitForTheDelegate(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		job := newJob(6)
		c := New(Options{Concurrency: 2, Rand: rand.New(rand.NewPCG(1, 2))})
		r := c.NewRun(job)
		up := &fakeParent{id: UpstreamID, job: job}
		r.SetUpstream(up, true)
		r.DenyUpstream([]int{0, 3})
		r.AddParent(&fakeParent{id: "delegate", job: job})
		errc := make(chan error, 1)
		go func() { errc <- r.Run(context.Background()) }()
		synctest.Wait()
		if n := job.from(UpstreamID); n != 4 {
			t.Fatalf("%d pieces from the upstream before the delegate announced, want the 4 not denied", n)
		}
		r.Announce("delegate", job.checksums(0, 3), nil)
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
		if job.source[0] != "delegate" || job.source[3] != "delegate" {
			t.Errorf("denied pieces from %s and %s, want the delegate", job.source[0], job.source[3])
		}
	})
}

// A delegate that never sends leaves the owner to the upstream after
// StallTimeout: denied pieces still arrive.
func TestDeniedPiecesAfterStall(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		job := newJob(4)
		r := New(Options{Concurrency: 2, StallTimeout: 10 * time.Second}).NewRun(job)
		r.SetUpstream(&fakeParent{id: UpstreamID, job: job}, true)
		r.DenyUpstream([]int{2})
		r.AddParent(&fakeParent{id: "delegate", job: job})
		start := time.Now()
		if err := r.Run(context.Background()); err != nil {
			t.Fatal(err)
		}
		if job.from(UpstreamID) != 4 || time.Since(start) < 10*time.Second {
			t.Errorf("%d from the upstream after %v", job.from(UpstreamID), time.Since(start))
		}
	})
}

// timedParent records when each piece was asked for, and sends it once
// gate is closed.
type timedParent struct {
	fakeParent
	gate chan struct{}
	at   []time.Time
}

func (p *timedParent) Fetch(ctx context.Context, i int, off, n int64) (io.ReadCloser, error) {
	p.mu.Lock()
	p.at = append(p.at, time.Now())
	p.mu.Unlock()
	select {
	case <-p.gate:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return p.fakeParent.Fetch(ctx, i, off, n)
}

// TestIdleWorkersWake: idle workers look again when a wanted piece is
// announced, within idleCoalesce and not after idleTick, and a worker that
// found work wakes the next: pieces announced at once are all asked for at
// once, while the first are still on their way.
func TestIdleWorkersWake(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		job := newJob(8)
		c := New(Options{Concurrency: 4, PerParent: 4, Rand: rand.New(rand.NewPCG(1, 2))})
		r := c.NewRun(job)
		p := &timedParent{fakeParent: fakeParent{id: "p", job: job}, gate: make(chan struct{})}
		r.AddParent(p)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		errc := make(chan error, 1)
		go func() { errc <- r.Run(ctx) }()
		time.Sleep(time.Second) // every worker idle, their ticks long gone by
		synctest.Wait()

		start := time.Now()
		r.Announce("p", job.checksums(0, 1, 2), nil) // one change: one token
		time.Sleep(idleCoalesce)
		synctest.Wait()
		if len(p.at) != 3 {
			t.Fatalf("%d pieces asked for, want 3", len(p.at))
		}
		for k, at := range p.at {
			if d := at.Sub(start); d > idleCoalesce {
				t.Errorf("piece %d asked %v after the announcement, want within %v", k, d, idleCoalesce)
			}
		}

		// The rest are all fetched once announced.
		close(p.gate)
		r.Announce("p", job.checksums(job.all()...), nil)
		select {
		case err := <-errc:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(idleTick):
			t.Fatal("the run did not finish within idleTick of the last announcement")
		}
	})
}

// A parent's checksums cost nothing a piece until one is announced: a
// cluster's children hold a queue per parent, and parents that announce no
// checksums (the simulator's) would hold four bytes a piece for nothing.
func TestChecksumsKeptOnlyOnceAnnounced(t *testing.T) {
	job := newJob(8)
	r := newCollector(SelectorState, nil).NewRun(job)
	r.AddParent(&fakeParent{id: "p", job: job})
	r.Announce("p", []Held{{Index: 3}}, nil)
	pq := r.parents["p"]
	if pq.crc != nil || pq.checksum(3) != 0 {
		t.Fatalf("zero checksum allocated %d", len(pq.crc))
	}
	r.Announce("p", []Held{{Index: 5, CRC: 0xbeef}, {Index: 6}}, nil)
	r.SetAuthority("p")
	for i, want := range []uint32{0, 0, 0, 0, 0, 0xbeef, 0, 0} {
		if got := pq.checksum(i); got != want {
			t.Errorf("piece %d: checksum %#x, want %#x", i, got, want)
		}
		if got := r.trusted[i]; got != want {
			t.Errorf("piece %d: trusted checksum %#x, want %#x", i, got, want)
		}
	}
}

// TestElsewhereForFollowsPieceTime: a parent that sent a piece elsewhere is
// left alone for twice this run's typical peer piece time (a moving
// average of the pieces done), within a twentieth of ElsewhereFor and
// ElsewhereFor itself; before any peer piece, for ElsewhereFor.
func TestElsewhereForFollowsPieceTime(t *testing.T) {
	for _, tc := range []struct {
		name string
		took []time.Duration // peer pieces done before the refusal
		want time.Duration
	}{
		{"no piece yet", nil, time.Second},
		{"fast pieces", []time.Duration{100 * time.Millisecond}, 200 * time.Millisecond},
		{"very fast pieces: the floor", []time.Duration{5 * time.Millisecond}, 50 * time.Millisecond},
		{"slow pieces: the ceiling", []time.Duration{2 * time.Second}, time.Second},
		{"moving average", []time.Duration{100 * time.Millisecond, 900 * time.Millisecond}, 400 * time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clk := &fixedClock{t: time.Unix(1e9, 0)}
			c := New(Options{Concurrency: 1, Now: clk.now, ElsewhereFor: time.Second})
			job := newJob(4)
			r := c.NewRun(job)
			p := &fakeParent{id: "p", job: job}
			r.AddParent(p)
			r.Announce("p", job.checksums(0, 1, 2, 3), nil)
			pq := r.parents["p"]
			ctx := context.Background()
			for k, took := range tc.took {
				pq.inflight++
				if err := r.finish(ctx, 0, pq, took, nil); err != nil {
					t.Fatal(err)
				}
				if k == 0 && r.pieceTime != took {
					t.Fatalf("first piece: average %v, want %v", r.pieceTime, took)
				}
			}
			pq.inflight++
			if err := r.finish(ctx, 1, pq, time.Millisecond, ErrElsewhere); err != nil {
				t.Fatal(err)
			}
			now := clk.t
			if !r.offers(pq, 0, now) || r.offers(pq, 1, now.Add(tc.want-time.Millisecond)) || !r.offers(pq, 1, now.Add(tc.want)) {
				t.Fatalf("piece 1 refused until %v, want %v from now",
					r.epochTime(pq.refused[1]).Sub(now), tc.want)
			}
		})
	}
}

// A Peer announces for its own parent only: once removed (its stream
// ended), a late update is dropped, also after a parent of the same name
// came back in its place.
func TestPeerRemovedIgnoresLateUpdates(t *testing.T) {
	job := newJob(10)
	r := newCollector(SelectorState, nil).NewRun(job)
	old := r.AddParent(&fakeParent{id: "p", job: job})
	old.Announce(job.checksums(0, 1), []int{2})
	if again := r.AddParent(&fakeParent{id: "p", job: job}); again.pq != old.pq {
		t.Fatal("adding a parent again replaced its books")
	}
	old.Remove()
	old.Remove() // twice: nothing more to take back
	for i := range job.done {
		if r.holders[i] != 0 || r.fetchers[i] != 0 {
			t.Fatalf("piece %d: %d holders, %d fetchers after removal", i, r.holders[i], r.fetchers[i])
		}
	}
	p := &fakeParent{id: "p", job: job}
	back := r.AddParent(p)
	old.Announce(job.checksums(job.all()...), nil)
	old.AnnounceComplete(job.checksums(job.all()...))
	if r.holders[5] != 0 || back.pq.has[5] {
		t.Fatal("a removed parent's update reached the one that replaced it")
	}
	back.Announce(job.checksums(job.all()...), nil)
	run(t, r)
	if job.from("p") != 10 {
		t.Fatalf("%d pieces from the parent that came back, want 10", job.from("p"))
	}
}

// TestSlowLinkSendsOnlyRarePieces: while another peer sends this node a
// piece, a parent on a link under a quarter of the fastest parent's is
// asked only for pieces no other parent holds; with nothing else in
// flight, for any; a parent whose state is unknown is not held back.
func TestSlowLinkSendsOnlyRarePieces(t *testing.T) {
	states := map[string]*pb.HostState{
		"fast": {MaxTxBandwidth: 25e6, UploadLimit: 16},
		"slow": {MaxTxBandwidth: 2.5e6, UploadLimit: 16},
	}
	job := newJob(6)
	job.next = 0
	r := newCollector(SelectorState, states).NewRun(job)
	for _, id := range []string{"fast", "slow", "unknown"} {
		r.AddParent(&fakeParent{id: id, job: job})
	}
	r.Announce("fast", job.checksums(0, 1, 2, 3), nil)
	r.Announce("slow", job.checksums(0, 1, 2, 3, 4, 5), nil)
	fast, slow, unknown := r.parents["fast"], r.parents["slow"], r.parents["unknown"]
	now := r.epoch.Add(time.Minute)
	picks := func() map[int]bool {
		got := map[int]bool{}
		for range 50 {
			if i, pq, _ := (statePolicy{}).pick(r, now); pq == slow {
				got[i] = true
			} else if pq != nil {
				t.Fatalf("picked %s, want slow or none", pq.id)
			}
		}
		return got
	}
	fast.inflight = r.c.opts.PerParent // fetching from fast: it is busy, and a piece is coming
	if got := picks(); !maps.Equal(got, map[int]bool{4: true}) {
		t.Errorf("fast busy: slow asked for %v, want only 4 (of its own two, the nearest)", got)
	}
	r.setWantedLocked(4, false)
	r.setWantedLocked(5, false)
	if got := picks(); len(got) != 0 {
		t.Errorf("slow holds nothing of its own: asked for %v", got)
	}
	if now.Before(slow.dry) {
		t.Error("held back, the slow parent was marked dry (that is for refusals)")
	}
	fast.inflight, fast.blocked = 0, now.Add(time.Hour) // nothing in flight: slow may send anything
	if got := picks(); !got[0] {
		t.Errorf("nothing else in flight: slow asked for %v, want the urgent piece 0", got)
	}
	// A parent with no known state is not slow.
	r.Announce("unknown", job.checksums(0), nil)
	fast.inflight, fast.blocked = r.c.opts.PerParent, time.Time{}
	slow.blocked = now.Add(time.Hour)
	if i, pq, _ := (statePolicy{}).pick(r, now); pq != unknown || i != 0 {
		t.Errorf("picked piece %d from %v, want 0 from the parent of unknown state", i, pq)
	}
}
