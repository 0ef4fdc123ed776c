package task

import (
	"context"
	"fmt"
	"io"
	"os"

	"github.com/registry-proxy/registry-proxy/blobstore"
)

// readable is how many bytes from off can be read in state st: the run of
// done pieces from off, less the blob's last byte (and the byte before hold)
// until the digest has matched, so no reader ever receives a whole blob that
// is not verified.
func readable(st blobstore.State, off, size, hold int64) int64 {
	end := st.End
	if !st.Sealed && end >= size {
		end = size - 1
	}
	if !st.Sealed && hold > 0 && end >= hold {
		end = hold - 1
	}
	return max(end-off, 0)
}

// Reader reads the blob as it arrives. It is an io.ReadSeeker, so
// http.ServeContent can serve it with ranges.
type Reader struct {
	t    *Task
	ctx  context.Context
	f    *os.File
	off  int64
	gen  int
	hold int64 // see HoldUntilVerified
}

// HoldUntilVerified makes the reader keep back the byte before end until the
// whole blob has matched its digest, as it always keeps back the blob's last
// byte: a response for a range ending at end is never completed with bytes
// that may turn out not to be the blob's.
func (r *Reader) HoldUntilVerified(end int64) {
	r.t.mu.Lock()
	r.hold = end
	r.t.mu.Unlock()
}

// NewReader returns a reader of the blob; reads block until the bytes have
// arrived, ctx ends or the task fails. Close it when done.
func (t *Task) NewReader(ctx context.Context) (*Reader, error) {
	f, err := t.partial.OpenData()
	if err != nil {
		if e := t.Err(); e != nil {
			return nil, e
		}
		return nil, fmt.Errorf("task: open %s: %w", t.req.Digest, err)
	}
	r := &Reader{t: t, ctx: ctx, f: f, gen: t.partial.StateAt(0).Resets}
	now := t.m.opts.Now()
	t.mu.Lock()
	t.readers[r] = struct{}{}
	t.wantedAt = now
	t.mu.Unlock()
	return r, nil
}

// available blocks until bytes at the reader's offset can be read and says
// how many; io.EOF at the end of a verified blob.
func (r *Reader) available() (int64, error) {
	t := r.t
	for {
		t.mu.Lock()
		off, hold := r.off, r.hold
		t.mu.Unlock()
		st := t.partial.StateAt(off)
		switch n := readable(st, off, t.plan.Size, hold); {
		case st.Resets != r.gen:
			return 0, ErrDigestMismatch
		case n > 0:
			return n, nil
		case st.Sealed && off >= t.plan.Size:
			return 0, io.EOF
		}
		if err := t.Err(); err != nil {
			return 0, err
		}
		select {
		case <-st.Changed:
		case <-t.finished:
			if err := t.Err(); err != nil {
				return 0, err
			}
			if st.Closed {
				return 0, fmt.Errorf("task: %s: download ended", t.req.Digest)
			}
		case <-r.ctx.Done():
			return 0, r.ctx.Err()
		}
	}
}

// advance moves the offset, which Next reads under the task's lock.
func (r *Reader) advance(n int64) {
	r.t.mu.Lock()
	r.off += n
	r.t.mu.Unlock()
}

// Read implements io.Reader.
func (r *Reader) Read(p []byte) (int, error) {
	n, err := r.available()
	if err != nil {
		return 0, err
	}
	if int64(len(p)) > n {
		p = p[:n]
	}
	m, err := r.f.ReadAt(p, r.off)
	r.advance(int64(m))
	if err == io.EOF && m > 0 {
		err = nil
	}
	return m, err
}

// WriteTo copies the rest of the blob to w as it arrives. Each run of
// available bytes goes out with one copy from the file, which the kernel does
// with sendfile when w is a TCP connection (an http.ResponseWriter is).
func (r *Reader) WriteTo(w io.Writer) (int64, error) {
	var total int64
	for {
		n, err := r.available()
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
		if _, err := r.f.Seek(r.off, io.SeekStart); err != nil {
			return total, err
		}
		m, err := io.Copy(w, &io.LimitedReader{R: r.f, N: n})
		total += m
		r.advance(m)
		if err != nil {
			return total, err
		}
		if m < n {
			return total, io.ErrUnexpectedEOF
		}
	}
}

// Seek implements io.Seeker.
func (r *Reader) Seek(offset int64, whence int) (int64, error) {
	switch whence {
	case io.SeekStart:
	case io.SeekCurrent:
		offset += r.off
	case io.SeekEnd:
		offset += r.t.plan.Size
	default:
		return 0, fmt.Errorf("task: bad whence %d", whence)
	}
	if offset < 0 {
		return 0, fmt.Errorf("task: negative offset")
	}
	r.t.mu.Lock()
	r.off = offset
	r.t.mu.Unlock()
	return offset, nil
}

// Close releases the reader.
func (r *Reader) Close() error {
	now := r.t.m.opts.Now()
	r.t.mu.Lock()
	delete(r.t.readers, r)
	r.t.wantedAt = now // the grace period starts when the last reader leaves
	r.t.mu.Unlock()
	return r.f.Close()
}
