package manifest

import (
	"bytes"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
)

const oci = "application/vnd.oci.image.manifest.v1+json"

func response(mt, body, header string, length int64) *http.Response {
	h := http.Header{"Content-Type": []string{mt}}
	if header != "" {
		h.Set("Docker-Content-Digest", header)
	}
	return &http.Response{StatusCode: 200, Header: h, ContentLength: length, Body: io.NopCloser(strings.NewReader(body))}
}

func TestRead(t *testing.T) {
	body := `{"schemaVersion":2}`
	d := digest.FromString(body)
	other := digest.FromString("other")
	for _, tt := range []struct {
		name, mt, header string
		want             digest.Digest
		limit            int64
		ok               bool
	}{
		{"by digest", oci, "", d, 100, true},
		{"by tag, header", oci, d.String(), "", 100, true},
		{"by tag, no header", oci, "", "", 100, true},
		{"parameters in the type", oci + "; charset=utf-8", "", d, 100, true},
		{"not a manifest", "text/html", "", d, 100, false},
		{"wrong digest asked", oci, "", other, 100, false},
		{"header lies", oci, other.String(), "", 100, false},
		{"too large", oci, "", d, 5, false},
		{"sha512", oci, "", digest.SHA512.FromString(body), 100, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			m, err := Read(response(tt.mt, body, tt.header, -1), tt.want, tt.limit)
			if (err == nil) != tt.ok {
				t.Fatalf("Read = %v, want ok=%v", err, tt.ok)
			}
			if err != nil && !errors.Is(err, ErrInvalid) {
				t.Fatalf("refusal %v is not ErrInvalid", err)
			}
			if err == nil && (string(m.Content) != body || (tt.want != "" && m.Digest != tt.want)) {
				t.Fatalf("got %+v", m)
			}
		})
	}
	// A Content-Length past the limit is refused before the body is read.
	if _, err := Read(response(oci, body, "", 1<<40), d, 100); !errors.Is(err, ErrInvalid) {
		t.Fatalf("a claimed size past the limit: %v", err)
	}
}

func TestCheck(t *testing.T) {
	body := []byte(`{"schemaVersion":2}`)
	d := digest.FromBytes(body)
	if _, err := Check(d, oci, body, 100); err != nil {
		t.Fatal(err)
	}
	for name, f := range map[string]func() error{
		"other bytes": func() error { _, err := Check(d, oci, append(bytes.Clone(body), ' '), 100); return err },
		"media type":  func() error { _, err := Check(d, "application/octet-stream", body, 100); return err },
		"too large":   func() error { _, err := Check(d, oci, body, 3); return err },
		"algorithm":   func() error { _, err := Check("md5:00", oci, body, 100); return err },
	} {
		if err := f(); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: %v, want ErrInvalid", name, err)
		}
	}
}

// What a registry or a peer sends is taken only if it hashes to the digest
// asked for, whatever else it claims.
func FuzzRead(f *testing.F) {
	f.Add(oci, `{"schemaVersion":2}`, "", int64(-1), true)
	f.Add("application/vnd.docker.distribution.manifest.list.v2+json", `{}`, digest.FromString("{}").String(), int64(2), false)
	f.Fuzz(func(t *testing.T, mt, body, header string, length int64, byDigest bool) {
		var want digest.Digest
		if byDigest {
			want = digest.FromString(body)
		}
		m, err := Read(response(mt, body, header, length), want, 1<<16)
		if err != nil {
			return
		}
		if m.Digest.Algorithm().FromBytes(m.Content) != m.Digest || string(m.Content) != body || !MediaTypeOK(m.MediaType) {
			t.Fatalf("accepted %q as %s (%s)", body, m.Digest, m.MediaType)
		}
		if _, err := Check(m.Digest, m.MediaType, m.Content, 1<<16); err != nil {
			t.Fatalf("Read took what Check refuses: %v", err)
		}
	})
}
