// Package conntest serves HTTP for tests and counts the connections clients
// open to it: whether a client reused its connection is what tests of
// drained and refused responses check.
package conntest

import (
	"net"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
)

// Server is an httptest.Server that counts new connections.
type Server struct {
	*httptest.Server
	conns atomic.Int64
}

// New starts a server for h; the caller closes it.
func New(h http.Handler) *Server {
	s := &Server{Server: httptest.NewUnstartedServer(h)}
	s.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		if st == http.StateNew {
			s.conns.Add(1)
		}
	}
	s.Start()
	return s
}

// Conns is the number of connections opened so far.
func (s *Server) Conns() int64 { return s.conns.Load() }
