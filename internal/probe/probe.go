// Package probe reads a running registry-proxy's debug endpoints, for the
// demo, tests and benchmarks.
package probe

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"time"

	"github.com/registry-proxy/registry-proxy/task"
)

// Members returns how many live members the mirror at base sees.
func Members(ctx context.Context, base string) (int, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/debug/members", nil)
	if err != nil {
		return 0, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	var members []json.RawMessage
	if err := json.NewDecoder(resp.Body).Decode(&members); err != nil {
		return 0, fmt.Errorf("probe: members of %s: %w", base, err)
	}
	return len(members), nil
}

// WaitMembers waits until every mirror sees n members.
func WaitMembers(ctx context.Context, mirrors []string, n int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for _, m := range mirrors {
		for {
			got, _ := Members(ctx, m)
			if got == n {
				break
			}
			if time.Now().After(deadline) || ctx.Err() != nil {
				return fmt.Errorf("probe: %s sees %d of %d members", m, got, n)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return nil
}

// Blob returns where the mirror at base got a blob's bytes.
func Blob(ctx context.Context, base, digest string) (task.Stats, error) {
	var st task.Stats
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/debug/blobs/"+digest, nil)
	if err != nil {
		return st, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return st, err
	}
	defer resp.Body.Close()
	err = json.NewDecoder(resp.Body).Decode(&st)
	return st, err
}
