package collector

// The piece book: what each parent announced and what this node still wants.

import "time"

// parentQueue is what the run knows of one parent.
type parentQueue struct {
	p         Parent
	upstream  bool
	has       []bool      // per piece: announced
	list      []int       // the announced pieces, in the order announced
	crc       []uint32    // per piece: announced checksum
	fetching  []bool      // per piece: the parent itself is fetching it now
	fetchList []int       // the pieces marked in fetching (some since unmarked)
	offering  int         // pieces it has that this node wants (refusals aside)
	blocked   time.Time   // no pieces before this
	refused   []time.Time // per piece: not asked again before this (ErrElsewhere); nil until the first refusal
	inflight  int
	picks     int
	probe     probe // the upstream's: pieces at once
	bytes     int64
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
		r.wantedPos[i] = len(r.wantedList)
		r.wantedList = append(r.wantedList, i)
	} else {
		d = -1
		k, last := r.wantedPos[i], r.wantedList[len(r.wantedList)-1]
		r.wantedList[k], r.wantedPos[last] = last, k
		r.wantedList = r.wantedList[:len(r.wantedList)-1]
		r.wantedPos[i] = -1
	}
	r.nwanted += d
	for _, pq := range r.order {
		if pq.has[i] {
			pq.offering += d
		}
	}
}

// available says whether a peer parent may be given another piece now.
func (r *Run) available(pq *parentQueue, now time.Time) bool {
	return pq.blocked.Before(now) && pq.inflight < r.c.opts.PerParent
}

// offers says whether pq may be asked for piece i now.
func (pq *parentQueue) offers(i int, now time.Time) bool {
	if !pq.has[i] {
		return false
	}
	return pq.refused == nil || pq.refused[i].Before(now)
}

func (pq *parentQueue) refuse(i int, until time.Time) {
	if pq.refused == nil {
		pq.refused = make([]time.Time, len(pq.has))
	}
	pq.refused[i] = until
}
