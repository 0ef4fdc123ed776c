// Package seeding keeps a busy parent from sending a piece a second time
// while it holds pieces it has sent to no one (BitTorrent's super-seeding).
//
// A parent's upload is the scarce resource of a swarm: the owner receives
// the blob from the upstream at about the rate it can upload, so every
// duplicate it sends delays a piece no other node has. When it refuses a
// duplicate, the child takes the piece from the sibling that got the first
// copy, and the owner's upload goes to new pieces. The owner counts the
// pieces still on their way from the upstream as new: a duplicate sent while
// it waits for them would share its upload with them when they land. A
// parent with idle upload slots, or nothing new to offer, sends whatever it
// is asked for, and a piece whose last copy left long ago (its receiver may
// be too slow to pass it on) goes out again.
//
// A node reading from the upstream holds pieces no one else has yet, so it
// refuses duplicates from two uploads on. A relay (every other parent) holds
// pieces others hold too and its "sent to no one" pieces are often ones its
// children have already, so it sends duplicates up to more uploads: from
// two, each piece new to the swarm reached one more child per relay and
// round, and a relay's upload idled beside children lacking what it held
// (simulator, equal links, p99 × the bound: 300 nodes 1.39–1.43 with two,
// 1.30–1.32 with four; 1,000 nodes 1.48–1.65 and 1.40–1.41;
// docs/benchmarks/notebook.md).
package seeding

import (
	"sync"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
	"github.com/opencontainers/go-digest"
)

// Options configure a Ledger.
type Options struct {
	// Busy is the number of uploads in flight from which a node reading
	// the blob from the upstream refuses duplicates; below it the parent's
	// upload has room for them (default 2).
	Busy int
	// RelayBusy is the same for a node not reading from the upstream
	// (default 4).
	RelayBusy int
	// Blobs bounds how many blobs' counts are kept.
	Blobs int
	// Respread is how long after its last copy a piece is refused: past it
	// the child that got the copy is taken to be too slow to pass it on,
	// and the piece may go out again.
	Respread time.Duration
	// Now is the clock; time.Now when nil.
	Now func() time.Time
}

// Ledger counts the copies of each piece this host has sent.
type Ledger struct {
	opts Options
	// base is the clock's reading at New: copies are timed from it, in
	// durations, which compare as plain integers where time.Times compare
	// wall and monotonic readings (a refusal compares every piece's).
	base time.Time
	mu   sync.Mutex
	sent *lru.Cache[digest.Digest, *blob]
}

// Offer is what a node can send first copies of: every piece when All (it
// reads the blob from the upstream, so what it lacks is on its way, or it
// holds the whole blob), else the pieces Held marks.
type Offer struct {
	All  bool
	Held []bool
}

// Has says whether piece j is offered.
func (o Offer) Has(j int) bool { return o.All || j < len(o.Held) && o.Held[j] }

type blob struct {
	copies []uint32
	last   []time.Duration // of the last copy, since the ledger's base
}

// New returns an empty ledger.
func New(opts Options) *Ledger {
	if opts.Busy <= 0 {
		opts.Busy = 2
	}
	if opts.RelayBusy <= 0 {
		opts.RelayBusy = 4
	}
	if opts.Blobs <= 0 {
		opts.Blobs = 1024
	}
	if opts.Respread <= 0 {
		opts.Respread = 2 * time.Second
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	c, _ := lru.New[digest.Digest, *blob](opts.Blobs) // size > 0 cannot fail
	return &Ledger{opts: opts, base: opts.Now(), sent: c}
}

// Begin decides whether piece i of d (of count pieces) may be sent now to
// a child. offer is what this host has, or will have, to offer first
// copies of. reading: this node reads d
// from the upstream now. uploads is the number of uploads in flight, this
// one excluded. When ok, the copy is counted, and
// undo takes it back if the upload fails. When not, fresh marks the pieces
// it would send now instead (offered, and sent to no one or not lately), so
// the child learns in one round trip what it would otherwise learn from a
// refusal per piece.
func (l *Ledger) Begin(d digest.Digest, i, count int, offer Offer, reading bool, uploads int) (undo func(), fresh []bool, ok bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	b, found := l.sent.Get(d)
	if !found || len(b.copies) != count {
		b = &blob{copies: make([]uint32, count), last: make([]time.Duration, count)}
		l.sent.Add(d, b)
	}
	if i < 0 || i >= count {
		return func() {}, nil, true // not ours to judge: the caller answers "no such piece"
	}
	now := l.opts.Now().Sub(l.base)
	busy := l.opts.RelayBusy
	if reading {
		busy = l.opts.Busy
	}
	if b.copies[i] > 0 && uploads >= busy && now-b.last[i] < l.opts.Respread {
		if fresh, unsent := b.fresh(now, l.opts.Respread, offer); unsent {
			return nil, fresh, false
		}
	}
	b.copies[i]++
	prev := b.last[i]
	b.last[i] = now
	var once sync.Once
	return func() {
		once.Do(func() {
			l.mu.Lock()
			defer l.mu.Unlock()
			if b.copies[i] > 0 {
				b.copies[i]--
				b.last[i] = prev
			}
		})
	}, nil, true
}

// fresh marks the offered pieces sent to no one, or not since respread
// before now; unsent says whether any offered piece was sent to no one,
// which is what makes a refusal worth its round trip. A refusal scans the
// blob's pieces, and refusals outnumber pieces sent: the offer is a value
// whose Has inlines, not a function called per piece.
func (b *blob) fresh(now, respread time.Duration, offer Offer) (fresh []bool, unsent bool) {
	for j, n := range b.copies {
		if n > 0 && now-b.last[j] < respread || !offer.Has(j) {
			continue
		}
		if fresh == nil {
			fresh = make([]bool, len(b.copies))
		}
		fresh[j] = true
		unsent = unsent || n == 0
	}
	return fresh, unsent
}
