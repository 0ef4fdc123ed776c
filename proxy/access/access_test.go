package access

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/proxy/upstream"
)

// fakeUpstream lets through the credentials it knows, per repository.
type fakeUpstream struct {
	allowed map[string]string // Authorization -> repository
	down    bool
	calls   int
}

func (f *fakeUpstream) answer(repo string, hdr http.Header) error {
	f.calls++
	if f.down {
		return upstream.ErrUnavailable
	}
	if f.allowed[hdr.Get("Authorization")] == repo {
		return nil
	}
	return &upstream.StatusError{Code: http.StatusUnauthorized, Header: http.Header{"Www-Authenticate": []string{`Bearer realm="https://auth.test/token"`}}}
}

func (f *fakeUpstream) BlobSize(_ context.Context, _, repo string, _ digest.Digest, hdr http.Header) (int64, error) {
	return 1, f.answer(repo, hdr)
}

func (f *fakeUpstream) Manifest(_ context.Context, _, _, repo, _ string, hdr http.Header) (*http.Response, error) {
	if err := f.answer(repo, hdr); err != nil {
		return nil, err
	}
	return &http.Response{StatusCode: 200, Body: io.NopCloser(strings.NewReader(""))}, nil
}

const d = digest.Digest("sha256:1111111111111111111111111111111111111111111111111111111111111111")

func auth(v string) http.Header {
	h := http.Header{}
	if v != "" {
		h.Set("Authorization", v)
	}
	return h
}

func TestCheck(t *testing.T) {
	up := &fakeUpstream{allowed: map[string]string{"Bearer good": "team/private", "": "library/public"}}
	c := New(Options{Upstream: up, TTL: time.Hour})
	ctx := context.Background()
	tests := []struct {
		name, cred, repo string
		kind             Kind
		ok               bool
	}{
		{"authorized blob", "Bearer good", "team/private", Blob, true},
		{"authorized manifest", "Bearer good", "team/private", Manifest, true},
		{"anonymous refused", "", "team/private", Blob, false},
		{"other token refused", "Bearer other", "team/private", Blob, false},
		{"good token, other repository", "Bearer good", "team/other", Blob, false},
		{"anonymous public", "", "library/public", Blob, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := c.Check(ctx, "reg.test", tt.repo, d, tt.kind, auth(tt.cred))
			if (err == nil) != tt.ok {
				t.Fatalf("Check = %v, want ok=%v", err, tt.ok)
			}
			var se *upstream.StatusError
			if !tt.ok && (!errors.As(err, &se) || se.Code != 401 || se.Header.Get("WWW-Authenticate") == "") {
				t.Fatalf("refusal %v does not carry the upstream's 401 challenge", err)
			}
		})
	}
	// Every answer is remembered: asking again costs nothing.
	calls := up.calls
	for _, tt := range tests {
		c.Check(ctx, "reg.test", tt.repo, d, tt.kind, auth(tt.cred))
	}
	if up.calls != calls {
		t.Errorf("%d more upstream questions for remembered answers", up.calls-calls)
	}
}

// An upstream that could not be asked is not asked again for downFor (an
// outage does not hold every read up with retries), and never remembered as
// a refusal: once it is back, it is asked.
func TestUpstreamDownIsNotRemembered(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		up := &fakeUpstream{allowed: map[string]string{"Bearer good": "team/private"}, down: true}
		c := New(Options{Upstream: up})
		ctx := context.Background()
		if err := c.Check(ctx, "reg.test", "team/private", d, Blob, auth("Bearer good")); !errors.Is(err, upstream.ErrUnavailable) {
			t.Fatalf("Check with the upstream down = %v", err)
		}
		calls := up.calls
		if err := c.Check(ctx, "reg.test", "team/other", d, Manifest, auth("Bearer good")); !errors.Is(err, upstream.ErrUnavailable) || up.calls != calls {
			t.Fatalf("Check within downFor = %v after %d more calls; want the outage's error without asking", err, up.calls-calls)
		}
		up.down = false
		time.Sleep(downFor)
		if err := c.Check(ctx, "reg.test", "team/private", d, Blob, auth("Bearer good")); err != nil {
			t.Fatalf("Check after the upstream came back = %v", err)
		}
	})
}

// A repository the upstream served to an anonymous client is public for
// PublicTTL: while the upstream cannot be reached every client may read it,
// and one marked by a member too; other repositories are not.
func TestPublicWhileUpstreamDown(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		up := &fakeUpstream{allowed: map[string]string{"": "library/public", "Bearer good": "team/private"}}
		c := New(Options{Upstream: up, TTL: time.Minute, PublicTTL: time.Hour})
		ctx := context.Background()
		if err := c.Check(ctx, "reg.test", "library/public", d, Manifest, auth("")); err != nil {
			t.Fatal(err)
		}
		if err := c.Check(ctx, "reg.test", "team/private", d, Blob, auth("Bearer good")); err != nil {
			t.Fatal(err)
		}
		c.MarkPublic("reg.test", "library/told", time.Now().Add(-30*time.Minute))
		c.MarkPublic("reg.test", "library/old", time.Now().Add(-2*time.Hour))
		up.down = true
		time.Sleep(time.Minute)
		for _, tt := range []struct {
			repo, cred string
			ok         bool
		}{
			{"library/public", "", true},
			{"library/public", "Bearer someone", true},
			{"library/told", "", true},
			{"library/old", "", false},
			{"team/private", "", false},
			{"team/private", "Bearer other", false},
			{"team/private", "Bearer good", true}, // allowed within the last 24 h
		} {
			if err := c.Check(ctx, "reg.test", tt.repo, d, Blob, auth(tt.cred)); (err == nil) != tt.ok {
				t.Errorf("%s with %q while down: %v, want ok=%v", tt.repo, tt.cred, err, tt.ok)
			}
		}
		time.Sleep(time.Hour)
		if err := c.Check(ctx, "reg.test", "library/public", d, Blob, auth("")); err == nil {
			t.Error("public past public_ttl")
		}
	})
}

// While the upstream cannot be reached, a credential allowed before is
// still served; one never allowed is not.
func TestStaleAllowWhileUpstreamDown(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		up := &fakeUpstream{allowed: map[string]string{"Bearer good": "team/private"}}
		c := New(Options{Upstream: up, TTL: time.Minute})
		ctx := context.Background()
		if err := c.Check(ctx, "reg.test", "team/private", d, Blob, auth("Bearer good")); err != nil {
			t.Fatal(err)
		}
		up.down = true
		time.Sleep(time.Minute) // the fresh answer expired
		if err := c.Check(ctx, "reg.test", "team/private", d, Blob, auth("Bearer good")); err != nil {
			t.Fatalf("allowed before, upstream down: %v", err)
		}
		if err := c.Check(ctx, "reg.test", "team/private", d, Blob, auth("Bearer other")); err == nil {
			t.Fatal("never allowed, upstream down: served")
		}
	})
}

func TestAllowRecordsOwnFetch(t *testing.T) {
	up := &fakeUpstream{}
	c := New(Options{Upstream: up})
	c.Allow("reg.test", "team/private", d, Blob, auth("Bearer x"))
	if err := c.Check(context.Background(), "reg.test", "team/private", d, Blob, auth("Bearer x")); err != nil || up.calls != 0 {
		t.Fatalf("Check after Allow = %v with %d upstream calls", err, up.calls)
	}
	if err := c.Check(context.Background(), "reg.test", "team/private", d, Blob, auth("Bearer y")); err == nil {
		t.Fatal("Allow for one credential let another through")
	}
}
