package proxy_test

import (
	"context"
	"net/http"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"go.uber.org/goleak"

	"github.com/registry-proxy/registry-proxy/config"
	"github.com/registry-proxy/registry-proxy/internal/fetch"
	"github.com/registry-proxy/registry-proxy/internal/testregistry"
)

// Load: 500 clients at once on one cold blob, and 50 other cold blobs at
// the same time. The upstream sends each blob once, every response is the
// blob, and once the node is shut down no goroutine is left behind.
func TestLoad(t *testing.T) {
	// Checked after every cleanup: the node shut down, the registry closed.
	ignore := goleak.IgnoreCurrent()
	t.Cleanup(func() {
		http.DefaultTransport.(*http.Transport).CloseIdleConnections() // the test's pushes
		goleak.VerifyNone(t, ignore,
			// golang-lru's expirable cache runs a cleaner per cache, for the
			// life of the process.
			goleak.IgnoreTopFunction("github.com/hashicorp/golang-lru/v2/expirable.NewLRU[...].func1"))
	})
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 600}}
	defer client.CloseIdleConnections()
	e := newEnv(t, func(c *config.Config) { c.Limits.ClientConns = 1024 })
	ctx := context.Background()
	const others = 50
	var ds []string
	for i := 0; i < others; i++ {
		d, err := e.reg.PushBlob(ctx, "library/app", testregistry.RandomBytes(int64(1<<20+i*4096), uint64(100+i)))
		if err != nil {
			t.Fatal(err)
		}
		ds = append(ds, d)
	}
	e.reg.ResetCounters()
	hwm0 := vmHWM(t)

	const clients = 500
	var targets []fetch.Target
	for range clients {
		targets = append(targets, fetch.Target{URL: e.base + "/v2/library/app/blobs/" + e.blobD + e.ns, Digest: digest.Digest(e.blobD)})
	}
	for _, d := range ds {
		targets = append(targets, fetch.Target{URL: e.base + "/v2/library/app/blobs/" + d + e.ns, Digest: digest.Digest(d)})
	}
	took, errs := fetch.All(ctx, client, targets)
	for _, err := range errs {
		t.Error(err)
	}
	for _, d := range append(ds, e.blobD) {
		size := int64(len(e.blob))
		if d != e.blobD {
			size = int64(1<<20 + 4096*indexOf(ds, d))
		}
		if got := e.reg.BytesOf(d); got != size {
			t.Errorf("upstream sent %d bytes of %s, want one copy (%d)", got, d, size)
		}
	}
	t.Logf("%d clients on one cold blob and %d other cold blobs: %v; test process peak RSS %d MiB (%d MiB before)",
		clients, others, took.Round(time.Millisecond), vmHWM(t)>>10, hwm0>>10)
}

func indexOf(s []string, v string) int {
	for i, x := range s {
		if x == v {
			return i
		}
	}
	return -1
}

// vmHWM is this process's peak resident set, KiB.
func vmHWM(t *testing.T) int64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Skip("no /proc")
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			n, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return n
		}
	}
	return 0
}
