package collector

// One piece fetch.

import (
	"context"
	"errors"
	"io"
	"sync/atomic"
	"time"
)

type countingReader struct {
	r io.Reader
	n *atomic.Int64
}

func (c countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	return n, err
}

func (r *Run) fetch(ctx context.Context, i int, pq *parentQueue) error {
	ctx, cancelCause := context.WithCancelCause(ctx)
	cancel := func() { cancelCause(nil) }
	timer := time.AfterFunc(r.c.opts.PieceTimeout, cancel)
	off, n := r.job.Plan().Range(i)
	var fs *fetchState
	if !pq.upstream {
		fs = &fetchState{pq: pq, start: r.c.opts.Now(), size: n, cancel: cancelCause}
		r.mu.Lock()
		r.fetches[i] = fs
		r.mu.Unlock()
		defer func() {
			r.mu.Lock()
			if r.fetches[i] == fs {
				delete(r.fetches, i)
			}
			r.mu.Unlock()
		}()
		defer r.watchFetch(ctx, i, fs)()
	}
	body, err := pq.p.Fetch(ctx, i, off, n)
	defer cancel()
	defer timer.Stop()
	if err != nil {
		return stolen(ctx, err)
	}
	defer body.Close()
	// A peer's piece is checked against the owner's checksum where the
	// owner announced one (a checksum its sender could not choose), else
	// against the sender's own, which catches accidents. The digest, at the
	// end, catches the rest.
	r.mu.Lock()
	var crc uint32
	known := !pq.upstream && pq.has[i]
	if known {
		crc = pq.checksum(i)
		if r.trustedSeen[i] {
			crc = r.trusted[i]
		}
	}
	r.mu.Unlock()
	var src io.Reader = r.c.opts.Download.Reader(ctx, io.LimitReader(body, n+1))
	if fs != nil {
		src = countingReader{r: src, n: &fs.read}
	}
	err = stolen(ctx, r.job.Put(i, src, pq.p.ID(), Expect{CRC: crc, Known: known}))
	if err == nil && fs != nil {
		if secs := r.c.opts.Now().Sub(fs.start).Seconds(); secs > 0 {
			rate := float64(n) / secs
			r.mu.Lock()
			if pq.measured == 0 {
				pq.measured = rate
			} else {
				pq.measured = (pq.measured + rate) / 2
			}
			r.mu.Unlock()
		}
	}
	return err
}

// stolen reports a fetch cancelled by stealLocked or watchRate as the
// reason it was cancelled for.
func stolen(ctx context.Context, err error) error {
	if err != nil {
		if cause := context.Cause(ctx); errors.Is(cause, errStolen) || errors.Is(cause, errTooSlow) || errors.Is(cause, errRaced) {
			return cause
		}
	}
	return err
}
