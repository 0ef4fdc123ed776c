package preheat

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// fakeManifests serves manifests by registry/repo:ref.
type fakeManifests map[string][]byte

func (f fakeManifests) Manifest(_ context.Context, _, registry, repo, ref string, _ http.Header) (*http.Response, error) {
	b, ok := f[registry+"/"+repo+":"+ref]
	if !ok {
		return nil, fmt.Errorf("%s/%s:%s: not found", registry, repo, ref)
	}
	return &http.Response{StatusCode: 200, Header: http.Header{}, Body: io.NopCloser(bytes.NewReader(b))}, nil
}

func desc(mt string, b []byte) ocispec.Descriptor {
	return ocispec.Descriptor{MediaType: mt, Digest: digest.FromBytes(b), Size: int64(len(b))}
}

// image returns a manifest of a config and two layers, and its blobs.
func image(seed string) ([]byte, []string) {
	cfg, l1, l2 := []byte("config "+seed), []byte("layer one "+seed), []byte("layer two "+seed)
	m := ocispec.Manifest{MediaType: ocispec.MediaTypeImageManifest, Config: desc(ocispec.MediaTypeImageConfig, cfg),
		Layers: []ocispec.Descriptor{desc(ocispec.MediaTypeImageLayer, l1), desc(ocispec.MediaTypeImageLayer, l2)}}
	m.SchemaVersion = 2
	b, _ := json.Marshal(m)
	return b, []string{digest.FromBytes(cfg).String(), digest.FromBytes(l1).String(), digest.FromBytes(l2).String()}
}

func TestResolve(t *testing.T) {
	amd, amdBlobs := image("amd64")
	arm, armBlobs := image("arm64")
	idx := ocispec.Index{MediaType: ocispec.MediaTypeImageIndex, Manifests: []ocispec.Descriptor{
		{MediaType: ocispec.MediaTypeImageManifest, Digest: digest.FromBytes(amd), Size: int64(len(amd)), Platform: &ocispec.Platform{OS: "linux", Architecture: "amd64"}},
		{MediaType: ocispec.MediaTypeImageManifest, Digest: digest.FromBytes(arm), Size: int64(len(arm)), Platform: &ocispec.Platform{OS: "linux", Architecture: "arm64", Variant: "v8"}},
	}}
	idx.SchemaVersion = 2
	ib, _ := json.Marshal(idx)
	src := fakeManifests{
		"docker.io/library/app:v1":                                   ib,
		"docker.io/library/app:" + digest.FromBytes(amd).String():    amd,
		"docker.io/library/app:" + digest.FromBytes(arm).String():    arm,
		"reg.test/team/plain:latest":                                 amd,
		"reg.test/team/lying:v1":                                     []byte(strings.Replace(string(ib), digest.FromBytes(amd).Encoded(), digest.FromString("other").Encoded(), 1)),
		"reg.test/team/lying:" + digest.FromString("other").String(): amd,
		"reg.test/team/junk:v1":                                      []byte(`{"schemaVersion":2}`),
	}
	tests := []struct {
		image, platform string
		want            []string
		err             string
	}{
		{"app:v1", "linux/amd64", amdBlobs, ""},
		{"docker.io/library/app:v1", "linux/arm64", armBlobs, ""},
		{"reg.test/team/plain", "linux/arm64", amdBlobs, ""}, // a plain manifest: no platform to choose
		{"app:v1", "windows/amd64", nil, "no manifest for windows/amd64"},
		{"reg.test/team/lying:v1", "linux/amd64", nil, "does not match its digest"},
		{"reg.test/team/junk:v1", "linux/amd64", nil, "neither an image manifest nor an index"},
		{"reg.test/team/missing:v1", "linux/amd64", nil, "not found"},
		{"team/UPPER", "linux/amd64", nil, "cannot resolve image"},
		{"app:v1", "not a platform!", nil, "platform"},
	}
	for _, tt := range tests {
		t.Run(tt.image+"@"+tt.platform, func(t *testing.T) {
			blobs, err := Resolve(context.Background(), src, tt.image, tt.platform)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("err = %v, want %q", err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, b := range blobs {
				got = append(got, b.Digest)
			}
			if fmt.Sprint(got) != fmt.Sprint(tt.want) {
				t.Fatalf("blobs %v, want %v", got, tt.want)
			}
		})
	}
}

// fakeNode fetches instantly, or fails.
type fakeNode struct {
	id      string
	fail    bool
	fetched atomic.Int64
}

func (n *fakeNode) ID() string { return n.id }

func (n *fakeNode) Fetch(_ context.Context, _, _ string, _ digest.Digest, report func(done, size int64)) error {
	n.fetched.Add(1)
	if n.fail {
		return errors.New("no route to host")
	}
	report(10, 10)
	return nil
}

type fakeCluster []Node

func (c fakeCluster) Nodes() []Node { return c }

// POST /preheat: every chosen node fetches every blob once; the events end
// with done and the failures counted; a bad image is a 400.
func TestServeHTTP(t *testing.T) {
	m, blobs := image("x")
	a, b, c := &fakeNode{id: "a"}, &fakeNode{id: "b", fail: true}, &fakeNode{id: "c"}
	p := &Preheater{Manifests: fakeManifests{"reg.test/team/app:v1": m, "reg.test/team/same:v1": m}, Cluster: fakeCluster{a, b, c}, Logger: slog.New(slog.DiscardHandler)}
	srv := httptest.NewServer(p)
	defer srv.Close()
	post := func(req Request) (*http.Response, []Event) {
		body, _ := json.Marshal(req)
		resp, err := http.Post(srv.URL, "application/json", bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var evs []Event
		dec := json.NewDecoder(resp.Body)
		for {
			var e Event
			if err := dec.Decode(&e); err != nil {
				break
			}
			evs = append(evs, e)
		}
		return resp, evs
	}
	resp, evs := post(Request{Images: []string{"reg.test/team/app:v1", "reg.test/team/same:v1"}, Nodes: 2})
	if resp.StatusCode != 200 || len(evs) == 0 {
		t.Fatalf("status %s, %d events", resp.Status, len(evs))
	}
	if evs[0].Type != "plan" || len(evs[0].Nodes) != 2 || len(evs[0].Blobs) != len(blobs) {
		t.Fatalf("plan = %+v, want 2 nodes and %d blobs once each", evs[0], len(blobs))
	}
	last := evs[len(evs)-1]
	if last.Type != "done" || last.Failed != len(blobs) {
		t.Fatalf("done = %+v, want node b's %d failures", last, len(blobs))
	}
	if a.fetched.Load() != int64(len(blobs)) || c.fetched.Load() != 0 {
		t.Fatalf("fetches: a %d, c %d; want a every blob, c none (--nodes 2)", a.fetched.Load(), c.fetched.Load())
	}
	results := 0
	for _, e := range evs {
		if e.Type == "result" {
			results++
			if (e.Node == "b") != (e.Error != "") {
				t.Errorf("result %+v", e)
			}
		}
	}
	if results != 2*len(blobs) {
		t.Errorf("%d results, want %d", results, 2*len(blobs))
	}
	for _, tc := range []struct {
		req  Request
		code int
	}{
		{Request{}, 400},
		{Request{Images: []string{"Bad Image"}}, 400},
		{Request{Images: []string{"reg.test/team/app:v1"}, Platform: "linux/amd64/v2/extra"}, 400},
	} {
		if resp, _ := post(tc.req); resp.StatusCode != tc.code {
			t.Errorf("%+v: %s, want %d", tc.req, resp.Status, tc.code)
		}
	}
	if resp, err := http.Get(srv.URL); err != nil || resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("GET: %v %v", resp.Status, err)
	}
}

// FuzzResolve: whatever an upstream answers for a manifest, Resolve returns
// blobs with valid digests and sizes, or an error.
func FuzzResolve(f *testing.F) {
	m, _ := image("fuzz")
	f.Add(m)
	f.Add([]byte(`{"manifests":[{"digest":"sha256:zz","platform":{"os":"linux","architecture":"amd64"}}]}`))
	f.Add([]byte(`{"config":{"digest":"sha256:` + strings.Repeat("a", 64) + `","size":-1}}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		blobs, err := Resolve(context.Background(), fakeManifests{"reg.test/f/f:v1": body}, "reg.test/f/f:v1", "linux/amd64")
		if err != nil {
			return
		}
		for _, b := range blobs {
			if _, err := digest.Parse(b.Digest); err != nil || b.Size <= 0 {
				t.Fatalf("blob %+v", b)
			}
		}
	})
}
