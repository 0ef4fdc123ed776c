// Package pace limits bytes per second through readers and writers with one
// token bucket whose rate can change while they run: the node's upload to
// peers (upload.rate) and its piece downloads (download.rate).
package pace

import (
	"context"
	"io"
	"sync/atomic"

	"golang.org/x/time/rate"
)

// chunk bounds one wait: a burst of one 256 KiB write keeps pacing smooth.
const chunk = 256 << 10

// Limiter is a rate in bytes/s shared by every reader and writer paced by
// it; 0 is unlimited.
type Limiter struct {
	lim *rate.Limiter
	bps atomic.Uint64
}

// New returns a limiter at bps bytes/s (0: unlimited) whose bucket holds
// 4 MiB: a few pieces' worth may go at once after a pause.
func New(bps uint64) *Limiter { return NewBurst(bps, 4<<20) }

// NewBurst is New with a bucket of burst bytes: a small one paces from the
// first byte.
func NewBurst(bps uint64, burst int) *Limiter {
	l := &Limiter{lim: rate.NewLimiter(rate.Inf, burst)}
	l.Set(bps)
	return l
}

// step is the most bytes one wait takes: a chunk, and never more than the
// bucket holds.
func (l *Limiter) step() int { return min(chunk, l.lim.Burst()) }

// Set changes the rate of a running limiter.
func (l *Limiter) Set(bps uint64) {
	l.bps.Store(bps)
	if bps == 0 {
		l.lim.SetLimit(rate.Inf)
		return
	}
	l.lim.SetLimit(rate.Limit(bps))
}

// Rate is the current rate, 0 when unlimited.
func (l *Limiter) Rate() uint64 {
	if l == nil {
		return 0
	}
	return l.bps.Load()
}

// wait takes n bytes' tokens, in chunks the bucket holds.
func (l *Limiter) wait(ctx context.Context, n int) error {
	if l.bps.Load() == 0 {
		return nil
	}
	return l.lim.WaitN(ctx, n)
}

// Reader paces r; nil l paces nothing.
func (l *Limiter) Reader(ctx context.Context, r io.Reader) io.Reader {
	if l == nil {
		return r
	}
	return &reader{r: r, ctx: ctx, l: l}
}

// Writer paces w; nil l paces nothing.
func (l *Limiter) Writer(ctx context.Context, w io.Writer) io.Writer {
	if l == nil {
		return w
	}
	return &writer{w: w, ctx: ctx, l: l}
}

type reader struct {
	r   io.Reader
	ctx context.Context
	l   *Limiter
}

func (p *reader) Read(b []byte) (int, error) {
	if n := p.l.step(); len(b) > n {
		b = b[:n]
	}
	n, err := p.r.Read(b)
	if n > 0 {
		if werr := p.l.wait(p.ctx, n); werr != nil {
			return n, werr
		}
	}
	return n, err
}

type writer struct {
	w   io.Writer
	ctx context.Context
	l   *Limiter
}

func (p *writer) Write(b []byte) (int, error) {
	written := 0
	for len(b) > 0 {
		c := b[:min(len(b), p.l.step())]
		if err := p.l.wait(p.ctx, len(c)); err != nil {
			return written, err
		}
		n, err := p.w.Write(c)
		written += n
		if err != nil {
			return written, err
		}
		b = b[len(c):]
	}
	return written, nil
}
