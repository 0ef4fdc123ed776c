package connlimit

import (
	"io"
	"net"
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
