package collector

// The piece book: what each parent announced and what this node still wants.

import "time"

// parentQueue is what the run knows of one parent.
type parentQueue struct {
	p        Parent
	id       string // p.ID(), read once
	removed  bool   // Peer.Remove took it out of the run
	upstream bool
	has      []bool  // per piece: announced
	list     []int32 // the announced pieces, in the order announced
	// crc is, per piece, the announced checksum; nil until one is not zero
	// (a parent that sends none, as the simulator's, costs nothing a piece).
	crc       []uint32
	fetching  []bool    // per piece: the parent itself is fetching it now
	fetchList []int     // the pieces marked in fetching (some since unmarked)
	offering  int       // pieces it has that this node wants (refusals aside)
	blocked   time.Time // no pieces before this
	// refused is, per piece, when it may be asked for again (ErrElsewhere),
	// in milliseconds from the run's epoch (rounded up): a cluster's
	// children hold one per parent and piece, so 4 bytes, not a
	// time.Time's 24. Nil until the first refusal.
	refused []uint32
	// dry: it offered none of the wanted pieces it has (all refused) when
	// last looked at, and cannot before this, unless it announces a wanted
	// piece or a piece is wanted again. Saves a failed pass over its
	// pieces on every pick.
	dry      time.Time
	inflight int
	picks    int
	probe    probe // the upstream's: pieces at once
	bytes    int64
	// measured is the rate its last pieces came at (bytes/s, a moving
	// average); 0 until one came. What it reports never counts for more.
	measured float64
}

// firstWantedLocked is the first wanted piece from the readers' cursor on
// (wrapping) that ok accepts.
func (r *Run) firstWantedLocked(ok func(int) bool) (int, bool) {
	start := r.cursor()
	for k := range r.n {
		if i := (start + k) % r.n; r.wanted[i] && ok(i) {
			return i, true
		}
	}
	return 0, false
}

// windowLocked returns up to limit wanted pieces from the readers' cursor
// on (wrapping), in order.
func (r *Run) windowLocked(limit int) (win []int) {
	start := r.cursor()
	for k := 0; k < r.n && len(win) < limit; k++ {
		if i := (start + k) % r.n; r.wanted[i] {
			win = append(win, i)
		}
	}
	return win
}

func (r *Run) cursor() int {
	if start := r.job.Next(); start >= 0 && start < r.n {
		return start
	}
	return 0
}

// setWantedLocked keeps wanted and every parent's offering count in step.
func (r *Run) setWantedLocked(i int, w bool) {
	if r.wanted[i] == w {
		return
	}
	r.wanted[i] = w
	d := 1
	if w {
		r.wantedPos[i] = int32(len(r.wantedList))
		r.wantedList = append(r.wantedList, int32(i))
	} else {
		d = -1
		k, last := r.wantedPos[i], r.wantedList[len(r.wantedList)-1]
		r.wantedList[k], r.wantedPos[last] = last, k
		r.wantedList = r.wantedList[:len(r.wantedList)-1]
		r.wantedPos[i] = -1
	}
	r.nwanted += d
	var ms uint32
	if w {
		ms = r.sinceEpoch(r.c.opts.Now())
	}
	for _, pq := range r.order {
		if pq.has[i] {
			pq.offering += d
			if w && !pq.refusedAt(i, ms) {
				pq.dry = time.Time{}
			}
		}
	}
}

// checksum is piece i's announced checksum (zero: none announced).
func (pq *parentQueue) checksum(i int) uint32 {
	if pq.crc == nil {
		return 0
	}
	return pq.crc[i]
}

func (pq *parentQueue) setChecksum(i int, crc uint32) {
	if pq.crc == nil {
		if crc == 0 {
			return
		}
		pq.crc = make([]uint32, len(pq.has))
	}
	pq.crc[i] = crc
}

// available says whether a peer parent may be given another piece now.
func (r *Run) available(pq *parentQueue, now time.Time) bool {
	return pq.blocked.Before(now) && pq.inflight < r.c.opts.PerParent
}

// offers says whether pq may be asked for piece i now.
func (r *Run) offers(pq *parentQueue, i int, now time.Time) bool {
	return pq.has[i] && !pq.refusedAt(i, r.sinceEpoch(now))
}

// refusedAt says whether piece i is refused at ms (from the run's epoch).
func (pq *parentQueue) refusedAt(i int, ms uint32) bool {
	return pq.refused != nil && pq.refused[i] > ms
}

// refuse has pq not asked for piece i before until (or a later refusal's
// end).
func (r *Run) refuse(pq *parentQueue, i int, until time.Time) {
	pq.refuseUntil(i, r.untilEpoch(until))
}

// refuseUntil is refuse with the end in ms from the run's epoch, for a
// refusal of many pieces at once.
func (pq *parentQueue) refuseUntil(i int, ms uint32) {
	if pq.refused == nil {
		pq.refused = make([]uint32, len(pq.has))
	}
	pq.refused[i] = max(pq.refused[i], ms)
}

// untilEpoch is until in whole milliseconds from the run's epoch, rounded
// up: a refusal lasts at least as long as asked.
func (r *Run) untilEpoch(until time.Time) uint32 {
	ms := max(until.Sub(r.epoch), 0)
	return uint32((ms + time.Millisecond - 1) / time.Millisecond)
}

// sinceEpoch is now in whole milliseconds from the run's epoch; the
// refusals' clock (49 days of range, far beyond a download).
func (r *Run) sinceEpoch(now time.Time) uint32 {
	return uint32(max(now.Sub(r.epoch), 0) / time.Millisecond)
}

// epochTime is ms from the run's epoch as a time.
func (r *Run) epochTime(ms uint32) time.Time {
	return r.epoch.Add(time.Duration(ms) * time.Millisecond)
}
