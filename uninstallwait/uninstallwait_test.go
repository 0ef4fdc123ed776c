package uninstallwait

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

// events is a slog handler that hands every record's message and
// attributes to the test as one line.
type events chan string

func (e events) Enabled(context.Context, slog.Level) bool { return true }
func (e events) Handle(_ context.Context, r slog.Record) error {
	var b strings.Builder
	b.WriteString(r.Message)
	r.Attrs(func(a slog.Attr) bool {
		fmt.Fprintf(&b, " %s=%v", a.Key, a.Value)
		return true
	})
	select {
	case e <- b.String():
	default: // the test stopped reading
	}
	return nil
}
func (e events) WithAttrs([]slog.Attr) slog.Handler { return e }
func (e events) WithGroup(string) slog.Handler      { return e }

// serve runs Serve on addr until the test ends.
func serve(t *testing.T, addr string) (stop func() error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	up := make(events, 1)
	errc := make(chan error, 1)
	go func() { errc <- Serve(ctx, addr, slog.New(up)) }()
	select {
	case <-up:
	case err := <-errc:
		cancel()
		t.Fatalf("Serve(%s): %v", addr, err)
	}
	stop = sync.OnceValue(func() error {
		cancel()
		return <-errc
	})
	t.Cleanup(func() { stop() })
	return stop
}

// freePort is a port free on both 127.0.0.1 and 127.0.0.2.
func freePort(t *testing.T) string {
	t.Helper()
	for range 20 {
		l1, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		_, port, _ := net.SplitHostPort(l1.Addr().String())
		l2, err := net.Listen("tcp", "127.0.0.2:"+port)
		l1.Close()
		if err == nil {
			l2.Close()
			return port
		}
	}
	t.Fatal("no port free on 127.0.0.1 and 127.0.0.2")
	return ""
}

// Wait does not return while one pod does not answer, however many rounds
// pass, and returns once it does; Serve stops on its context.
func TestWaitForEveryPod(t *testing.T) {
	port := freePort(t)
	stopA := serve(t, "127.0.0.1:"+port)
	log := make(events, 64)
	w := Waiter{
		Host: "cleanup.test", Port: port, Interval: 5 * time.Millisecond, Rounds: 3,
		Lookup: func(_ context.Context, host string) ([]string, error) {
			if host != "cleanup.test" {
				return nil, fmt.Errorf("unexpected host %q", host)
			}
			return []string{"127.0.0.2", "127.0.0.1"}, nil
		},
		Log: slog.New(log),
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- w.Wait(ctx) }()
	for failed := 0; failed < 2*w.Rounds; {
		select {
		case l := <-log:
			if !strings.Contains(l, "1 of 2 cleanup pods not answering: 127.0.0.2") {
				t.Fatalf("log %q, want 127.0.0.2 named as not answering", l)
			}
			failed++
		case err := <-done:
			t.Fatalf("Wait returned %v with a pod not answering", err)
		}
	}
	serve(t, "127.0.0.2:"+port)
	if err := <-done; err != nil {
		t.Fatalf("Wait: %v", err)
	}
	if err := stopA(); err != nil {
		t.Errorf("Serve after its context ended: %v", err)
	}
}

// A name without addresses (no pod yet) is waited on; the error at the end
// says why.
func TestWaitNoPods(t *testing.T) {
	log := make(events, 64)
	w := Waiter{
		Host: "cleanup.test", Port: "1", Interval: 5 * time.Millisecond,
		Lookup: func(context.Context, string) ([]string, error) { return nil, nil },
		Log:    slog.New(log),
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Wait(ctx) }()
	for range 5 {
		if l := <-log; !strings.Contains(l, "resolves to no address") {
			t.Fatalf("log %q", l)
		}
	}
	cancel()
	if err := <-done; err == nil || !strings.Contains(err.Error(), "resolves to no address") {
		t.Errorf("Wait = %v, want the last reason", err)
	}
}

// A probe answered by something else than 200 is not done.
func TestWaitStatus(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusServiceUnavailable)
	}))
	defer srv.Close()
	_, port, _ := net.SplitHostPort(srv.Listener.Addr().String())
	w := Waiter{Host: "h", Port: port, Client: srv.Client(),
		Lookup: func(context.Context, string) ([]string, error) { return []string{"127.0.0.1"}, nil }}
	if _, err := w.round(context.Background()); err == nil || !strings.Contains(err.Error(), "status 503") {
		t.Errorf("round = %v, want status 503", err)
	}
}
