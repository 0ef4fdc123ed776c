// Package uninstallwait lets the Helm chart's post-delete hook wait until
// `registry-proxy containerd-config --uninstall` has run on every node: each
// node's cleanup pod answers on /readyz once it has (Serve, after its init
// container), and one Job resolves the pods' headless Service and probes
// every address until all answer, several rounds in a row (Wait).
package uninstallwait

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"
)

// Path is what Serve answers and Wait asks.
const Path = "/readyz"

// Serve answers 200 on Path at addr until ctx ends. It runs in the cleanup
// pod's container, which starts only after the init container's uninstall
// succeeded: answering is the news.
func Serve(ctx context.Context, addr string, log *slog.Logger) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("uninstallwait: %w", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+Path, func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "containerd-config --uninstall done")
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	log.Info("uninstall done; answering the waiter", "listen", ln.Addr().String(), "path", Path)
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("uninstallwait: %w", err)
	case <-ctx.Done():
	}
	shut, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return srv.Shutdown(shut)
}

// Waiter probes every address of a name.
type Waiter struct {
	// Host is the cleanup pods' headless Service name; Port their port.
	Host, Port string
	// Lookup resolves Host (default net.DefaultResolver.LookupHost).
	Lookup func(ctx context.Context, host string) ([]string, error)
	// Interval between rounds (default 2 s); Rounds in a row in which every
	// address answers (default 3): pods the DaemonSet controller creates
	// a moment later are in the next round's answer.
	Interval time.Duration
	Rounds   int
	Client   *http.Client
	Log      *slog.Logger
}

// Wait returns nil once every address Host resolves to has answered 200
// on Path in Rounds rounds in a row, or ctx's error with what was still
// missing. A name that resolves to nothing is not done: its pods are not
// there yet.
func (w Waiter) Wait(ctx context.Context) error {
	if w.Lookup == nil {
		w.Lookup = net.DefaultResolver.LookupHost
	}
	if w.Interval <= 0 {
		w.Interval = 2 * time.Second
	}
	if w.Rounds <= 0 {
		w.Rounds = 3
	}
	if w.Client == nil {
		w.Client = &http.Client{Timeout: 2 * time.Second}
	}
	if w.Log == nil {
		w.Log = slog.New(slog.DiscardHandler)
	}
	var ok int
	var last error
	giveUp := func() error {
		if last == nil {
			last = fmt.Errorf("%d of %d rounds done", ok, w.Rounds)
		}
		return fmt.Errorf("uninstallwait: %w; last: %w", ctx.Err(), last)
	}
	for {
		n, err := w.round(ctx)
		if ctx.Err() != nil {
			return giveUp() // err is the cut-off round's: the one before says more
		}
		if err != nil {
			ok, last = 0, err
			w.Log.Info("waiting for the cleanup pods", "reason", err)
		} else {
			ok++
			w.Log.Info("every cleanup pod answered", "pods", n, "round", ok, "of", w.Rounds)
			if ok == w.Rounds {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return giveUp()
		case <-time.After(w.Interval):
		}
	}
}

// round probes every address once and returns how many answered, or
// which did not.
func (w Waiter) round(ctx context.Context) (int, error) {
	addrs, err := w.Lookup(ctx, w.Host)
	if err != nil {
		return 0, fmt.Errorf("resolving %s: %w", w.Host, err)
	}
	if len(addrs) == 0 {
		return 0, fmt.Errorf("%s resolves to no address", w.Host)
	}
	slices.Sort(addrs)
	var mu sync.Mutex
	var failed []string
	var wg sync.WaitGroup
	sem := make(chan struct{}, 16)
	for _, a := range addrs {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			if err := w.probe(ctx, a); err != nil {
				mu.Lock()
				failed = append(failed, fmt.Sprintf("%s (%v)", a, err))
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if len(failed) > 0 {
		slices.Sort(failed)
		return 0, fmt.Errorf("%d of %d cleanup pods not answering: %s", len(failed), len(addrs), strings.Join(failed, ", "))
	}
	return len(addrs), nil
}

func (w Waiter) probe(ctx context.Context, addr string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+net.JoinHostPort(addr, w.Port)+Path, nil)
	if err != nil {
		return err
	}
	resp, err := w.Client.Do(req)
	if err != nil {
		var op *net.OpError
		if errors.As(err, &op) {
			return op.Err
		}
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("status %d", resp.StatusCode)
	}
	return nil
}
