package upstream

import (
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Bounds of a Retry-After honoured: a registry that names none is asked
// again after defaultRetryAfter, one that names days after maxRetryAfter.
const (
	defaultRetryAfter = 30 * time.Second
	maxRetryAfter     = time.Hour
)

type throttleKeyT struct{ host, method, kind string }

// throttleKey is what a 429 holds back: requests of one method and kind to
// one host. Docker Hub refuses manifest GETs past its pull limit while HEADs
// and blobs still go, so those are not held back with them.
func throttleKey(req *http.Request) throttleKeyT {
	kind := "other"
	switch p := req.URL.Path; {
	case strings.Contains(p, "/manifests/"):
		kind = "manifests"
	case strings.Contains(p, "/blobs/"):
		kind = "blobs"
	}
	return throttleKeyT{host: req.URL.Host, method: req.Method, kind: kind}
}

// throttle remembers, per key, until when a 429's Retry-After holds.
type throttle struct {
	now func() time.Time
	mu  sync.Mutex
	m   map[throttleKeyT]time.Time
}

func newThrottle(now func() time.Time) *throttle {
	return &throttle{now: now, m: map[throttleKeyT]time.Time{}}
}

// until returns how long k is still held back.
func (t *throttle) until(k throttleKeyT) (time.Duration, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	end, ok := t.m[k]
	if !ok {
		return 0, false
	}
	left := end.Sub(t.now())
	if left <= 0 {
		delete(t.m, k)
		return 0, false
	}
	return left, true
}

// set holds k back for a Retry-After (seconds or an HTTP date) and returns
// for how long.
func (t *throttle) set(k throttleKeyT, retryAfter string) time.Duration {
	now := t.now()
	wait := parseRetryAfter(retryAfter, now)
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.m) > 1024 {
		clear(t.m) // hosts are a bounded set; this only caps a flood of names
	}
	t.m[k] = now.Add(wait)
	return wait
}

func parseRetryAfter(v string, now time.Time) time.Duration {
	v = strings.TrimSpace(v)
	wait := defaultRetryAfter
	if n, err := strconv.Atoi(v); err == nil && n >= 0 {
		wait = time.Duration(n) * time.Second
	} else if at, err := http.ParseTime(v); err == nil {
		wait = at.Sub(now)
	}
	return min(max(wait, time.Second), maxRetryAfter)
}
