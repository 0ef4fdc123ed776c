// Package relay sends one blob's worth of bytes from an origin to every node
// on a schedule fixed in advance, over plain TCP: the Kumar–Ross schedule, in
// which each node gets its share from the origin and relays it to every other
// node as it arrives. No selection, no hashing, no disk: what it takes against
// the Kumar–Ross bound is what the network itself (its links, their
// queueing, TCP's sharing of them) costs a schedule that reaches the bound on
// paper, the yardstick for the P2P engine on the same network.
package relay

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"
)

// Namespace is where an endpoint's sockets are made: a network namespace
// of a test lab, or this process's own network.
type Namespace interface {
	// Do runs f with its sockets made in the namespace.
	Do(f func() error) error
}

// Here is this process's own network namespace.
type Here struct{}

// Do runs f.
func (Here) Do(f func() error) error { return f() }

// Endpoint is a participant: the address it listens on, in its namespace.
type Endpoint struct {
	IP string
	NS Namespace
}

// Schedule is who gets which chunk from the origin.
type Schedule string

const (
	// Split gives node k the k-th of len(nodes) equal parts, fixed in
	// advance: the schedule of the bound's proof.
	Split Schedule = "split"
	// Dealt gives the next chunk to whichever node's origin stream is ready
	// and whose relays have caught up (at most two chunks waiting on any of
	// them): the same relaying, with the shares adapted to how TCP
	// actually divides the links.
	Dealt Schedule = "dealt"
)

// Options of a run.
type Options struct {
	Size     int64
	Chunk    int64 // bytes a frame; 256 KiB when 0
	Schedule Schedule
}

// Result is each node's time from the start to its last byte.
type Result struct {
	Done []time.Duration
}

// Max is the slowest node's time.
func (r Result) Max() time.Duration {
	var m time.Duration
	for _, d := range r.Done {
		m = max(m, d)
	}
	return m
}

// frame header: chunk index, payload length.
const headerLen = 8

// originID is the origin's sender id at the start of its connections.
const originID = ^uint32(0)

// Run sends opts.Size bytes from origin to every node and returns when every
// node has all of them, or on the first error (ctx's end among them).
func Run(ctx context.Context, origin Endpoint, nodes []Endpoint, opts Options) (Result, error) {
	if len(nodes) == 0 || opts.Size <= 0 {
		return Result{}, errors.New("relay: no nodes or nothing to send")
	}
	if opts.Chunk <= 0 {
		opts.Chunk = 256 << 10
	}
	if opts.Chunk > 1<<30 {
		return Result{}, errors.New("relay: chunk above 1 GiB")
	}
	switch opts.Schedule {
	case Split, Dealt:
	default:
		return Result{}, fmt.Errorf("relay: unknown schedule %q", opts.Schedule)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	r := &run{opts: opts, chunks: int((opts.Size + opts.Chunk - 1) / opts.Chunk), zero: make([]byte, opts.Chunk)}
	r.nodes = make([]*node, len(nodes))
	for k, ep := range nodes {
		n := &node{k: k, ep: ep, relays: make([]*outQueue, len(nodes))}
		n.cond = sync.NewCond(&n.mu)
		r.nodes[k] = n
	}
	r.origin = sync.NewCond(&r.mu)

	// Listeners first, so every dial finds one.
	var closers []io.Closer
	defer func() {
		for _, c := range closers {
			c.Close()
		}
	}()
	for _, n := range r.nodes {
		err := n.ep.NS.Do(func() error {
			l, err := net.Listen("tcp", net.JoinHostPort(n.ep.IP, "0"))
			n.ln = l
			return err
		})
		if err != nil {
			return Result{}, fmt.Errorf("relay: listen on node %d: %w", n.k, err)
		}
		closers = append(closers, n.ln)
	}
	// Every connection: origin to each node, each node to every other.
	// Each connection begins with its sender: originID or a node's index.
	dial := func(from Endpoint, id uint32, to *node) (net.Conn, error) {
		var c net.Conn
		err := from.NS.Do(func() error {
			var d net.Dialer
			var err error
			c, err = d.DialContext(ctx, "tcp", to.ln.Addr().String())
			return err
		})
		if err != nil {
			return nil, err
		}
		if _, err := c.Write(binary.BigEndian.AppendUint32(nil, id)); err != nil {
			c.Close()
			return nil, err
		}
		return c, nil
	}
	var fromOrigin []net.Conn
	for _, n := range r.nodes {
		c, err := dial(origin, originID, n)
		if err != nil {
			return Result{}, fmt.Errorf("relay: origin to node %d: %w", n.k, err)
		}
		closers = append(closers, c)
		fromOrigin = append(fromOrigin, c)
		for _, m := range r.nodes {
			if m == n {
				continue
			}
			c, err := dial(n.ep, uint32(n.k), m)
			if err != nil {
				return Result{}, fmt.Errorf("relay: node %d to node %d: %w", n.k, m.k, err)
			}
			closers = append(closers, c)
			n.relays[m.k] = &outQueue{c: c}
		}
	}
	g, ctx := errgroup.WithContext(ctx)
	// Whatever fails or ends first wakes every waiter.
	context.AfterFunc(ctx, func() {
		for _, c := range closers {
			c.Close()
		}
		r.wakeAll()
	})
	var accepted sync.WaitGroup
	for _, n := range r.nodes {
		accepted.Add(len(r.nodes)) // from the origin and every other node
		g.Go(func() error {
			for j := range len(r.nodes) {
				c, err := n.ln.Accept()
				if err != nil {
					for range len(r.nodes) - j {
						accepted.Done() // none will come: let the wait end
					}
					return fmt.Errorf("relay: node %d accept: %w", n.k, err)
				}
				accepted.Done()
				g.Go(func() error { defer c.Close(); return r.receive(n, c) })
			}
			return nil
		})
	}
	accepted.Wait()
	r.start = time.Now()
	for _, n := range r.nodes {
		g.Go(func() error { return r.feed(n, fromOrigin[n.k]) })
		for _, q := range n.relays {
			if q != nil {
				g.Go(func() error { return r.forward(n, q) })
			}
		}
	}
	// Done when every node has every byte; then the rest is let go.
	g.Go(func() error {
		r.mu.Lock()
		for r.finished < len(r.nodes) && !r.stopped {
			r.origin.Wait()
		}
		r.mu.Unlock()
		cancel()
		return nil
	})
	err := g.Wait()
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.finished < len(r.nodes) {
		return Result{}, errors.Join(errors.New("relay: not every node got every byte"), err, context.Cause(ctx))
	}
	res := Result{Done: make([]time.Duration, len(r.nodes))}
	for k, n := range r.nodes {
		res.Done[k] = n.done
	}
	return res, nil
}

type run struct {
	opts   Options
	chunks int
	zero   []byte
	nodes  []*node
	start  time.Time

	mu       sync.Mutex
	origin   *sync.Cond // waits on nodes' relays (Dealt) and on the end
	next     int        // Dealt: the next chunk to deal
	finished int
	stopped  bool // the run ended or failed: every waiter leaves
}

type node struct {
	k      int
	ep     Endpoint
	ln     net.Listener
	relays []*outQueue // by destination; nil for itself

	mu       sync.Mutex
	cond     *sync.Cond
	received int64
	done     time.Duration
}

// outQueue is one relay connection's chunks to send, in arrival order.
type outQueue struct {
	c    net.Conn
	q    []int
	sent int
}

func (r *run) wakeAll() {
	r.mu.Lock()
	r.stopped = true
	r.origin.Broadcast()
	r.mu.Unlock()
	for _, n := range r.nodes {
		n.mu.Lock()
		n.cond.Broadcast()
		n.mu.Unlock()
	}
}

func (r *run) chunkLen(i int) int64 {
	return min(r.opts.Chunk, r.opts.Size-int64(i)*r.opts.Chunk)
}

// feed is the origin's stream to node n.
func (r *run) feed(n *node, c net.Conn) error {
	first, end := 0, 0
	if r.opts.Schedule == Split {
		first, end = n.k*r.chunks/len(r.nodes), (n.k+1)*r.chunks/len(r.nodes)
	}
	for i := first; ; i++ {
		if r.opts.Schedule == Dealt {
			var ok bool
			if i, ok = r.deal(n); !ok {
				break
			}
		} else if i >= end {
			break
		}
		if err := r.send(c, i); err != nil {
			return fmt.Errorf("relay: origin to node %d: %w", n.k, err)
		}
	}
	return nil
}

// deal hands node n the next chunk once its relays have caught up.
func (r *run) deal(n *node) (int, bool) {
	for {
		n.mu.Lock()
		behind := 0
		for _, q := range n.relays {
			if q != nil {
				behind = max(behind, len(q.q)-q.sent)
			}
		}
		n.mu.Unlock()
		r.mu.Lock()
		if r.next >= r.chunks || r.stopped {
			r.mu.Unlock()
			return 0, false
		}
		if behind < 2 {
			i := r.next
			r.next++
			r.mu.Unlock()
			return i, true
		}
		r.origin.Wait() // a relay sent a chunk
		r.mu.Unlock()
	}
}

func (r *run) send(c net.Conn, i int) error {
	var h [headerLen]byte
	n := r.chunkLen(i)
	binary.BigEndian.PutUint32(h[:4], uint32(i))
	binary.BigEndian.PutUint32(h[4:], uint32(n))
	if _, err := c.Write(h[:]); err != nil {
		return err
	}
	_, err := c.Write(r.zero[:n])
	return err
}

// receive reads frames from one connection into node n; a chunk from the
// origin is queued on every one of n's relays once whole.
func (r *run) receive(n *node, c net.Conn) error {
	buf := make([]byte, 64<<10)
	var h [headerLen]byte
	if _, err := io.ReadFull(c, h[:4]); err != nil {
		return fmt.Errorf("relay: node %d read sender: %w", n.k, err)
	}
	fromOrigin := binary.BigEndian.Uint32(h[:4]) == originID
	for {
		if _, err := io.ReadFull(c, h[:]); err != nil {
			if errors.Is(err, io.EOF) || r.over() {
				return nil
			}
			return fmt.Errorf("relay: node %d read: %w", n.k, err)
		}
		i, size := int(binary.BigEndian.Uint32(h[:4])), int64(binary.BigEndian.Uint32(h[4:]))
		if i >= r.chunks || size != r.chunkLen(i) {
			return fmt.Errorf("relay: node %d: bad frame (chunk %d, %d bytes)", n.k, i, size)
		}
		for left := size; left > 0; {
			m, err := c.Read(buf[:min(left, int64(len(buf)))])
			left -= int64(m)
			if err != nil && left > 0 {
				if r.over() {
					return nil
				}
				return fmt.Errorf("relay: node %d read chunk %d: %w", n.k, i, err)
			}
			r.got(n, int64(m))
		}
		if fromOrigin {
			n.mu.Lock()
			for _, q := range n.relays {
				if q != nil {
					q.q = append(q.q, i)
				}
			}
			n.cond.Broadcast()
			n.mu.Unlock()
		}
	}
}

func (r *run) got(n *node, m int64) {
	n.mu.Lock()
	n.received += m
	done := n.received == r.opts.Size
	if done {
		n.done = time.Since(r.start)
	}
	n.mu.Unlock()
	if done {
		r.mu.Lock()
		r.finished++
		r.origin.Broadcast()
		r.mu.Unlock()
	}
}

// over says whether every node has every byte, or the run failed.
func (r *run) over() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.finished == len(r.nodes) || r.stopped
}

// forward sends node n's chunks from the origin on one relay connection.
func (r *run) forward(n *node, q *outQueue) error {
	for {
		n.mu.Lock()
		for q.sent == len(q.q) && !r.over() {
			n.cond.Wait()
		}
		if q.sent == len(q.q) {
			n.mu.Unlock()
			return nil
		}
		i := q.q[q.sent]
		n.mu.Unlock()
		if err := r.send(q.c, i); err != nil {
			if r.over() {
				return nil
			}
			return fmt.Errorf("relay: node %d forward: %w", n.k, err)
		}
		n.mu.Lock()
		q.sent++
		n.mu.Unlock()
		r.mu.Lock()
		r.origin.Broadcast() // Dealt: its relays caught up a little
		r.mu.Unlock()
	}
}
