package collector

// The upstream's concurrency: grown while it pays.

import "time"

// probe finds how many pieces to fetch from the upstream at once. An
// upstream that paces each connection sends more with more pieces at once;
// one whose link is the limit (or is shared with the swarm's other readers)
// sends no more, and pieces started together then share it and land
// together, later each, so the swarm gets its first copies in bursts. So a
// run starts with one piece at once and, after each round (as many pieces
// done as the limit), doubles it only while that round came at least half
// the ideal gain faster than the one before (1.5 × for twice as many);
// otherwise it goes back to the limit before and stays there. Doubling
// reaches eight in three rounds: a paced upstream waits little for it.
type probe struct {
	limit   int
	prev    int // the limit of the round before
	settled bool
	// warm: the first piece landed. It carried the connection's setup
	// (TLS, a token) and is not measured: a slow first round would make
	// any second look like a gain.
	warm  bool
	start time.Time // of this round; zero before the first piece
	bytes int64     // done this round
	done  int
	rate  float64 // of the round before, bytes/s
}

// room is the number of pieces the upstream may have in flight now.
func (p *probe) room(most int) int {
	return max(1, min(p.limit, most))
}

// picked notes a piece started; the first starts the first round.
func (p *probe) picked(now time.Time) {
	if p.limit == 0 {
		p.limit = 1
	}
	if p.start.IsZero() {
		p.start = now
	}
}

// landed notes a piece of n bytes done, and ends the round when it is full.
func (p *probe) landed(now time.Time, n int64, most int) {
	if p.settled || p.start.IsZero() {
		return
	}
	if !p.warm {
		p.warm, p.start = true, now
		return
	}
	p.bytes += n
	p.done++
	if p.done < p.limit {
		return
	}
	secs := now.Sub(p.start).Seconds()
	if secs <= 0 {
		return // a round in no time (a fake clock): measure on
	}
	rate := float64(p.bytes) / secs
	switch {
	case p.rate > 0 && rate < p.rate*(1+0.5*float64(p.limit-p.prev)/float64(p.prev)):
		p.limit = p.prev
		p.settled = true
	case p.limit >= most:
		p.settled = true
	default:
		p.prev, p.limit = p.limit, min(2*p.limit, most)
	}
	p.rate, p.start, p.bytes, p.done = rate, now, 0, 0
}
