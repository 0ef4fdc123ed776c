package connlimit

import (
	"io"
	"net"
	"net/http"
	"testing"
	"time"
)

func TestPerAddressCap(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	refused := make(chan net.Addr, 10)
	l := New(ln, 2)
	l.Refused = func(a net.Addr) { refused <- a }
	defer l.Close()
	accepted := make(chan net.Conn, 10)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	var clients []net.Conn
	for range 3 {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		clients = append(clients, c)
	}
	a1, a2 := <-accepted, <-accepted
	<-refused // the third
	// The third client sees its connection closed.
	clients[2].SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := clients[2].Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("third connection: read %v, want EOF", err)
	}
	if n := l.Open("127.0.0.1"); n != 2 {
		t.Fatalf("%d open, want 2", n)
	}
	// One closes: a new one is accepted.
	a1.Close()
	a1.Close() // twice counts once
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	a3 := <-accepted
	defer a2.Close()
	defer a3.Close()
	if n := l.Open("127.0.0.1"); n != 2 {
		t.Fatalf("%d open after one closed and one came, want 2", n)
	}
}

// At the cap a new connection closes the longest idle keep-alive one of its
// address; when none is idle it is refused.
func TestIdleEvictedFirst(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := New(ln, 2)
	evicted := make(chan net.Addr, 10)
	refused := make(chan net.Addr, 10)
	l.Evicted = func(a net.Addr) { evicted <- a }
	l.Refused = func(a net.Addr) { refused <- a }
	release := make(chan struct{})
	srv := &http.Server{ConnState: l.ConnState, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/block" {
			<-release
		}
		io.WriteString(w, "ok")
	})}
	go srv.Serve(l)
	defer srv.Close()
	url := "http://" + ln.Addr().String()

	// Two clients with a keep-alive connection each, idle after a request.
	idle := func() *http.Client {
		c := &http.Client{Transport: &http.Transport{MaxConnsPerHost: 1}}
		resp, err := c.Get(url + "/")
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return c
	}
	a, b := idle(), idle()
	defer a.CloseIdleConnections()
	defer b.CloseIdleConnections()
	waitIdle(t, l, 2)
	// A third: the longest idle is closed, the new one served.
	c := &http.Client{Transport: &http.Transport{}}
	resp, err := c.Get(url + "/")
	if err != nil {
		t.Fatalf("a new connection at the cap with idle ones: %v", err)
	}
	resp.Body.Close()
	<-evicted
	if n := l.Open("127.0.0.1"); n != 2 {
		t.Fatalf("%d open, want 2", n)
	}
	c.CloseIdleConnections()
	a.CloseIdleConnections()
	b.CloseIdleConnections()

	// Two requests in flight hold both places: a third is refused.
	for l.Open("127.0.0.1") > 0 {
		time.Sleep(time.Millisecond) // the server sees the closes
	}
	done := make(chan error, 2)
	for range 2 {
		go func() {
			resp, err := (&http.Client{Transport: &http.Transport{}}).Get(url + "/block")
			if err == nil {
				resp.Body.Close()
			}
			done <- err
		}()
	}
	for l.Open("127.0.0.1") < 2 {
		time.Sleep(time.Millisecond)
	}
	cn, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer cn.Close()
	<-refused
	close(release)
	for range 2 {
		if err := <-done; err != nil {
			t.Fatalf("a request in flight was cut: %v", err)
		}
	}
}

// waitIdle waits until n connections of 127.0.0.1 are idle.
func waitIdle(t *testing.T, l *Listener, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		l.mu.Lock()
		idle := 0
		for c := range l.conns["127.0.0.1"] {
			if !c.idleSince.IsZero() {
				idle++
			}
		}
		l.mu.Unlock()
		if idle >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d idle connections, want %d", idle, n)
		}
		time.Sleep(time.Millisecond)
	}
}
