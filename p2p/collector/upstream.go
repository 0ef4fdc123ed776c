package collector

// The upstream registry as a parent, Range-ignoring registries included.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"sync"
	"sync/atomic"

	"github.com/opencontainers/go-digest"
)

// BlobSource reads byte ranges of blobs from a registry; *upstream.Client is one.
type BlobSource interface {
	// Blob opens bytes [off, off+n) of d; whole is true when the registry
	// ignored Range and the body holds the whole blob from offset 0.
	Blob(ctx context.Context, registry, repo string, d digest.Digest, off, n int64, hdr http.Header) (body io.ReadCloser, whole bool, err error)
}

// UpstreamID names the upstream registry among a job's parents.
const UpstreamID = "upstream"

// upstreamParent reads each piece with a Range request. A registry that
// ignores Range sends the whole blob instead: from then on the pieces come
// in turn from one stream of it, each skipping to its offset (as
// containerd's fetcher does), and a piece behind the stream opens it again.
type upstreamParent struct {
	src            BlobSource
	registry, repo string
	digest         digest.Digest
	header         http.Header
	log            *slog.Logger

	// wholeOnly: the registry ignored Range once; every piece comes from
	// the stream.
	wholeOnly atomic.Bool
	// turn is held by the piece reading the stream (a lock a waiting
	// piece gives up on when its context ends); stream is the turn
	// holder's.
	turn   chan struct{}
	stream *wholeStream
	// ctx outlives the pieces that read a stream; Close ends it.
	ctx    context.Context
	cancel context.CancelFunc
}

// wholeStream is an open body of the blob at offset pos, holding bytes up
// to end (-1: to the blob's end).
type wholeStream struct {
	body     io.ReadCloser
	pos, end int64
	cancel   context.CancelFunc
	once     sync.Once
}

func (s *wholeStream) close() {
	s.once.Do(func() {
		s.body.Close()
		s.cancel()
	})
}

// NewUpstreamParent returns the registry as a parent of one blob, fetched with
// the client's credentials. The run that uses it closes it.
func (c *Collector) NewUpstreamParent(src BlobSource, registry, repo string, d digest.Digest, hdr http.Header) Parent {
	ctx, cancel := context.WithCancel(context.Background())
	return &upstreamParent{src: src, registry: registry, repo: repo, digest: d, header: hdr, log: c.log,
		turn: make(chan struct{}, 1), ctx: ctx, cancel: cancel}
}

func (p *upstreamParent) ID() string { return UpstreamID }

func (p *upstreamParent) Fetch(ctx context.Context, _ int, off, n int64) (io.ReadCloser, error) {
	if !p.wholeOnly.Load() {
		body, whole, err := p.src.Blob(ctx, p.registry, p.repo, p.digest, off, n, p.header)
		if err != nil || !whole {
			return body, err
		}
		// This body ends with this piece's request: the stream the pieces
		// share is opened anew, to outlive it.
		body.Close()
		if !p.wholeOnly.Swap(true) {
			p.log.Info("the upstream ignores Range: reading the blob's pieces in order from one stream of the whole blob", "digest", p.digest, "registry", p.registry)
		}
	}
	return p.fromStream(ctx, off, n)
}

// fromStream waits its turn and returns bytes [off, off+n) of the stream;
// closing the piece passes the turn on.
func (p *upstreamParent) fromStream(ctx context.Context, off, n int64) (io.ReadCloser, error) {
	select {
	case p.turn <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	s := p.stream
	if s == nil || s.pos > off || (s.end >= 0 && off+n > s.end) {
		if s != nil {
			s.close()
		}
		var err error
		if s, err = p.open(ctx, off, n); err != nil {
			p.stream = nil
			<-p.turn
			return nil, err
		}
		p.stream = s
	}
	// The piece's context cuts the stream while the piece reads it: a
	// piece that times out does not keep the turn.
	piece := &streamPiece{p: p, s: s, left: n, stop: context.AfterFunc(ctx, s.close)}
	if skip := off - s.pos; skip > 0 {
		if _, err := io.CopyN(io.Discard, s.body, skip); err != nil {
			piece.fail()
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			return nil, fmt.Errorf("collector: upstream stream of %s, skipping to %d: %w", p.digest, off, err)
		}
		s.pos = off
	}
	return piece, nil
}

// open asks for bytes [off, off+n); the registry may send the whole blob.
// The request ends with ctx, the stream with Close.
func (p *upstreamParent) open(ctx context.Context, off, n int64) (*wholeStream, error) {
	sctx, cancel := context.WithCancel(p.ctx)
	stop := context.AfterFunc(ctx, cancel)
	body, whole, err := p.src.Blob(sctx, p.registry, p.repo, p.digest, off, n, p.header)
	if !stop() {
		// The piece gave up while the request ran.
		if err == nil {
			body.Close()
		}
		return nil, errors.Join(ctx.Err(), err)
	}
	if err != nil {
		cancel()
		return nil, err
	}
	s := &wholeStream{body: body, pos: 0, end: -1, cancel: cancel}
	if !whole {
		s.pos, s.end = off, off+n
	}
	return s, nil
}

// Close ends the stream, if one is open.
func (p *upstreamParent) Close() error {
	p.cancel()
	select {
	case p.turn <- struct{}{}:
		if p.stream != nil {
			p.stream.close()
			p.stream = nil
		}
		<-p.turn
	default:
		// A piece holds the stream: the cancelled context ends it.
	}
	return nil
}

// streamPiece is one piece read from the stream; it holds the turn until
// closed. Read whole, it leaves the stream at its end for the next piece;
// otherwise the stream is closed (where it stands is unknown).
type streamPiece struct {
	p    *upstreamParent
	s    *wholeStream
	left int64
	stop func() bool
	once sync.Once
}

func (r *streamPiece) Read(b []byte) (int, error) {
	if r.left <= 0 {
		return 0, io.EOF
	}
	if int64(len(b)) > r.left {
		b = b[:r.left]
	}
	n, err := r.s.body.Read(b)
	r.left -= int64(n)
	r.s.pos += int64(n)
	switch {
	case r.left == 0:
		err = nil
	case errors.Is(err, io.EOF):
		err = io.ErrUnexpectedEOF
	}
	return n, err
}

func (r *streamPiece) Close() error {
	r.once.Do(func() {
		if !r.stop() || r.left > 0 {
			r.fail()
			return
		}
		<-r.p.turn
	})
	return nil
}

// fail closes the stream and passes the turn on.
func (r *streamPiece) fail() {
	r.stop()
	r.s.close()
	r.p.stream = nil
	<-r.p.turn
}
