// Package connlimit caps the connections a listener holds open from one
// remote address, so one client cannot take every file descriptor of a node.
package connlimit

import (
	"net"
	"sync"
)

// Listener accepts at most PerAddr connections from one IP address at once;
// one more is closed at once.
type Listener struct {
	net.Listener
	perAddr int
	// Refused, when set, is told of each connection closed over the cap.
	Refused func(addr net.Addr)

	mu    sync.Mutex
	conns map[string]int
}

// New wraps ln; perAddr <= 0 means no cap.
func New(ln net.Listener, perAddr int) *Listener {
	return &Listener{Listener: ln, perAddr: perAddr, conns: map[string]int{}}
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
		if l.conns[h] >= l.perAddr {
			l.mu.Unlock()
			if l.Refused != nil {
				l.Refused(c.RemoteAddr())
			}
			c.Close()
			continue
		}
		l.conns[h]++
		l.mu.Unlock()
		return &conn{Conn: c, l: l, host: h}, nil
	}
}

// Open is how many connections from host are open now.
func (l *Listener) Open(host string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.conns[host]
}

type conn struct {
	net.Conn
	l    *Listener
	host string
	once sync.Once
}

func (c *conn) Close() error {
	c.once.Do(func() {
		c.l.mu.Lock()
		if c.l.conns[c.host]--; c.l.conns[c.host] <= 0 {
			delete(c.l.conns, c.host)
		}
		c.l.mu.Unlock()
	})
	return c.Conn.Close()
}
