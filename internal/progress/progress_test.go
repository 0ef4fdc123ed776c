package progress

import (
	"bytes"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
)

// A client that reads steadily gets the whole body; one that stops reading
// is cut off after the stall time, and the handler's write fails.
func TestStalledReaderCutOff(t *testing.T) {
	body := bytes.Repeat([]byte("x"), 64<<20) // more than the socket buffers hold
	handlerErr := make(chan error, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		pw := New(w, 300*time.Millisecond)
		defer pw.Done()
		_, err := io.Copy(pw, bytes.NewReader(body))
		handlerErr <- err
	}))
	defer srv.Close()

	// Steady reader.
	resp, err := http.Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	n, err := io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if err != nil || n != int64(len(body)) {
		t.Fatalf("steady reader: %d bytes, %v", n, err)
	}
	if err := <-handlerErr; err != nil {
		t.Fatalf("handler, steady reader: %v", err)
	}

	// A reader that never reads past the headers.
	conn, err := net.Dial("tcp", srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	io.WriteString(conn, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	select {
	case err := <-handlerErr:
		var ne net.Error
		if err == nil || !(errors.As(err, &ne) && ne.Timeout()) {
			t.Fatalf("handler for a stalled reader: %v, want a timeout", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("a stalled reader held the response")
	}
}
