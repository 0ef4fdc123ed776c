// Package progress bounds how long a response may wait for its reader: the
// write deadline is set afresh before each chunk, so a client that reads
// slowly but steadily is served for as long as it takes, and one that stops
// reading is cut off after the stall time instead of holding the blob, its
// file and its connection forever.
package progress

import (
	"errors"
	"io"
	"net/http"
	"time"
)

// chunk is how much one deadline covers. Sendfile still does each chunk.
const chunk = 4 << 20

// Writer is an http.ResponseWriter whose writes each get Stall to finish.
type Writer struct {
	http.ResponseWriter
	rc    *http.ResponseController
	stall time.Duration
	armed bool
}

// New wraps w; stall <= 0 returns w's wrapper without deadlines.
func New(w http.ResponseWriter, stall time.Duration) *Writer {
	return &Writer{ResponseWriter: w, rc: http.NewResponseController(w), stall: stall}
}

func (p *Writer) arm() {
	if p.stall <= 0 {
		return
	}
	// Armed unless the writer cannot take deadlines at all; Done clears it.
	err := p.rc.SetWriteDeadline(time.Now().Add(p.stall))
	p.armed = p.armed || !errors.Is(err, http.ErrNotSupported)
}

// Write implements io.Writer.
func (p *Writer) Write(b []byte) (int, error) {
	written := 0
	for len(b) > 0 {
		c := b[:min(len(b), chunk)]
		p.arm()
		n, err := p.ResponseWriter.Write(c)
		written += n
		if err != nil {
			return written, err
		}
		b = b[len(c):]
	}
	return written, nil
}

// ReadFrom copies r in chunks, each under a fresh deadline; an *os.File
// (or a LimitedReader of one) still goes out by sendfile.
func (p *Writer) ReadFrom(r io.Reader) (int64, error) {
	var total int64
	for {
		p.arm()
		n, err := io.CopyN(p.ResponseWriter, r, chunk)
		total += n
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}

// Done clears the deadline, so the connection's next request does not
// inherit it.
func (p *Writer) Done() {
	if p.armed {
		p.rc.SetWriteDeadline(time.Time{})
	}
}

// Unwrap lets http.ResponseController reach the writer beneath.
func (p *Writer) Unwrap() http.ResponseWriter { return p.ResponseWriter }
