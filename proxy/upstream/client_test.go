package upstream

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
)

func TestParseContentRange(t *testing.T) {
	tests := []struct {
		in               string
		start, end, size int64
		ok               bool
	}{
		{"bytes 0-99/100", 0, 99, 100, true},
		{"bytes 5-5/*", 5, 5, -1, true},
		{"bytes 4294967296-4294967395/8589934592", 4294967296, 4294967395, 8589934592, true},
		{"bytes 10-5/100", 0, 0, 0, false},
		{"bytes 0-100/100", 0, 0, 0, false},
		{"bytes -1-5/10", 0, 0, 0, false},
		{"items 0-1/2", 0, 0, 0, false},
		{"bytes 0-1", 0, 0, 0, false},
		{"", 0, 0, 0, false},
	}
	for _, tt := range tests {
		s, e, n, err := ParseContentRange(tt.in)
		if (err == nil) != tt.ok || (tt.ok && (s != tt.start || e != tt.end || n != tt.size)) {
			t.Errorf("ParseContentRange(%q) = %d %d %d %v", tt.in, s, e, n, err)
		}
	}
}

func FuzzParseContentRange(f *testing.F) {
	for _, s := range []string{"bytes 0-99/100", "bytes 5-5/*", "bytes 1-0/2", "bytes x-y/z"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		start, end, size, err := ParseContentRange(s)
		if err != nil {
			return
		}
		if start < 0 || end < start || (size != -1 && size <= end) {
			t.Fatalf("%q parsed to an impossible range %d-%d/%d", s, start, end, size)
		}
		if got := fmt.Sprintf("bytes %d-%d/", start, end); len(s) < len(got) {
			t.Fatalf("%q shorter than its parse", s)
		}
	})
}

func TestBaseURL(t *testing.T) {
	c, err := New(Options{Registries: map[string]string{"mirror.test": "http://127.0.0.1:5000/"},
		Allow: []string{"docker.io", "ghcr.io", "registry.local:5000", "[::1]:5000", "*.pkg.dev"}})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct{ name, want string }{
		{"mirror.test", "http://127.0.0.1:5000"},
		{"docker.io", DockerHub},
		{"ghcr.io", "https://ghcr.io"},
		{"registry.local:5000", "https://registry.local:5000"},
		{"[::1]:5000", "https://[::1]:5000"},
		{"europe-docker.pkg.dev", "https://europe-docker.pkg.dev"},
	}
	for _, tt := range tests {
		u, err := c.BaseURL(tt.name)
		if err != nil || u.String() != tt.want {
			t.Errorf("BaseURL(%q) = %v, %v; want %s", tt.name, u, err, tt.want)
		}
	}
	// Malformed, or well-formed but neither configured nor allowed (an open
	// relay would dial them).
	for _, bad := range []string{"", "a/b", "host:0", "host:99999", "a b", "user@host", "host?x",
		"127.0.0.1:22", "169.254.169.254", "localhost:6379", "evil.example", "pkg.dev.evil.example", "ghcr.io:8443x"} {
		if _, err := c.BaseURL(bad); !errors.Is(err, ErrUnknownRegistry) {
			t.Errorf("BaseURL(%q) = %v, want ErrUnknownRegistry", bad, err)
		}
	}
	if _, err := New(Options{Registries: map[string]string{"x": "ftp://x"}}); err == nil {
		t.Error("ftp upstream accepted")
	}
}

func FuzzBaseURL(f *testing.F) {
	c, _ := New(Options{Allow: []string{"docker.io", "ghcr.io", "*.pkg.dev"}})
	for _, s := range []string{"docker.io", "ghcr.io", "h:1", "[::1]:5000", "a/b", "x.pkg.dev"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		u, err := c.BaseURL(name)
		if err != nil {
			return
		}
		if u.Scheme != "https" || u.Host == "" || u.RawQuery != "" || u.User != nil {
			t.Fatalf("BaseURL(%q) = %v", name, u)
		}
	})
}

func TestValidRepository(t *testing.T) {
	for _, tc := range []struct {
		name string
		ok   bool
	}{
		{"library/app", true},
		{"app", true},
		{"team/sub.group/app_1__x-y--z", true},
		{strings.Repeat("a", 255), true},
		{strings.Repeat("a", 256), false},
		{"", false},
		{"/app", false},
		{"app/", false},
		{"team//app", false},
		{"../../admin", false},
		{"Team/App", false},
		{"localhost:5000/app", false},
		{"app:v1", false},
		{"app@sha256:" + strings.Repeat("a", 64), false},
		{"a..b", false},
		{"-app", false},
	} {
		if got := ValidRepository(tc.name); got != tc.ok {
			t.Errorf("ValidRepository(%q) = %v, want %v", tc.name, got, tc.ok)
		}
	}
}

// A registry's Retry-After, seconds or a date or garbage, holds requests
// back for a second to an hour, never less or more.
func FuzzRetryAfter(f *testing.F) {
	f.Add("120")
	f.Add("Wed, 21 Oct 2015 07:28:00 GMT")
	f.Add("-1")
	f.Add("99999999999999999999")
	f.Fuzz(func(t *testing.T, v string) {
		now := time.Unix(1_700_000_000, 0)
		if w := parseRetryAfter(v, now); w < time.Second || w > maxRetryAfter {
			t.Fatalf("Retry-After %q: %v", v, w)
		}
	})
}

func TestRetryAfter(t *testing.T) {
	now := time.Date(2026, 12, 7, 12, 0, 0, 0, time.UTC)
	for v, want := range map[string]time.Duration{
		"":                              defaultRetryAfter,
		"0":                             time.Second,
		"120":                           2 * time.Minute,
		"86400":                         maxRetryAfter,
		"Mon, 07 Dec 2026 12:05:00 GMT": 5 * time.Minute,
		"soon":                          defaultRetryAfter,
	} {
		if got := parseRetryAfter(v, now); got != want {
			t.Errorf("Retry-After %q: %v, want %v", v, got, want)
		}
	}
}

// Upstream metric labels are registry names and allow patterns, never a
// host:port a client or a redirect chose.
func TestHostLabel(t *testing.T) {
	c, err := New(Options{Registries: map[string]string{"internal.test": "http://10.1.2.3:5000"}, Allow: []string{"ghcr.io", "*.gcr.io", "docker.io"}})
	if err != nil {
		t.Fatal(err)
	}
	for host, want := range map[string]string{
		"10.1.2.3:5000":          "internal.test",
		"ghcr.io":                "ghcr.io",
		"ghcr.io:8443":           "other",
		"eu.gcr.io":              "*.gcr.io",
		"a.b.gcr.io":             "*.gcr.io",
		"eu.gcr.io:1234":         "other",
		"registry-1.docker.io":   "docker.io",
		"bucket.s3.amazonaws.io": "other",
	} {
		if got := c.hostLabel(host); got != want {
			t.Errorf("hostLabel(%q) = %q, want %q", host, got, want)
		}
	}
}
