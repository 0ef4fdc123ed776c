// Package connlimit caps the connections a listener holds open from one
// remote address, so one client cannot take every file descriptor of a node.
// At the cap an idle keep-alive connection of that address is closed to let
// the new one in: every local process is 127.0.0.1, and one holding idle
// connections must not lock the node's containerd out.
package connlimit

import (
	"net"
	"net/http"
	"sync"
	"time"
)

// Listener accepts at most PerAddr connections from one IP address at once;
// one more closes the longest idle of them, or is closed at once when none
// is idle. Idleness is what an http.Server reports through ConnState.
type Listener struct {
	net.Listener
	perAddr int
	// Refused, when set, is told of each connection closed over the cap.
	Refused func(addr net.Addr)
	// Evicted, when set, is told of each idle connection closed to let a
	// new one in.
	Evicted func(addr net.Addr)

	mu    sync.Mutex
	conns map[string]map[*conn]struct{}
}

// New wraps ln; perAddr <= 0 means no cap.
func New(ln net.Listener, perAddr int) *Listener {
	return &Listener{Listener: ln, perAddr: perAddr, conns: map[string]map[*conn]struct{}{}}
}

func hostOf(a net.Addr) string {
	if ta, ok := a.(*net.TCPAddr); ok {
		return ta.IP.String()
	}
	host, _, err := net.SplitHostPort(a.String())
	if err != nil {
		return a.String()
	}
	return host
}

// Accept implements net.Listener.
func (l *Listener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil || l.perAddr <= 0 {
			return c, err
		}
		h := hostOf(c.RemoteAddr())
		l.mu.Lock()
		var evict *conn
		if len(l.conns[h]) >= l.perAddr {
			evict = l.longestIdle(h)
			if evict == nil {
				l.mu.Unlock()
				if l.Refused != nil {
					l.Refused(c.RemoteAddr())
				}
				c.Close()
				continue
			}
			l.forget(evict)
		}
		cc := &conn{Conn: c, l: l, host: h}
		if l.conns[h] == nil {
			l.conns[h] = map[*conn]struct{}{}
		}
		l.conns[h][cc] = struct{}{}
		l.mu.Unlock()
		if evict != nil {
			if l.Evicted != nil {
				l.Evicted(evict.RemoteAddr())
			}
			evict.Conn.Close()
		}
		return cc, nil
	}
}

// longestIdle is host's connection idle the longest, nil if none is idle.
func (l *Listener) longestIdle(host string) *conn {
	var best *conn
	for c := range l.conns[host] {
		if !c.idleSince.IsZero() && (best == nil || c.idleSince.Before(best.idleSince)) {
			best = c
		}
	}
	return best
}

// forget drops c from the count; l.mu is held.
func (l *Listener) forget(c *conn) {
	if c.gone {
		return
	}
	c.gone = true
	delete(l.conns[c.host], c)
	if len(l.conns[c.host]) == 0 {
		delete(l.conns, c.host)
	}
}

// ConnState is the http.Server's ConnState hook: it tells which
// connections wait idle for their next request.
func (l *Listener) ConnState(nc net.Conn, st http.ConnState) {
	c, ok := nc.(*conn)
	if !ok {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if st == http.StateIdle {
		c.idleSince = time.Now()
	} else {
		c.idleSince = time.Time{}
	}
}

// Open is how many connections from host are open now.
func (l *Listener) Open(host string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.conns[host])
}

type conn struct {
	net.Conn
	l    *Listener
	host string
	// Under l.mu: when it went idle (zero while not), and whether it no
	// longer counts.
	idleSince time.Time
	gone      bool
}

func (c *conn) Close() error {
	c.l.mu.Lock()
	c.l.forget(c)
	c.l.mu.Unlock()
	return c.Conn.Close()
}
