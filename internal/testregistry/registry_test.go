package testregistry

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

func start(t *testing.T) *Registry {
	t.Helper()
	r, err := Start(Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// do sends one request on a fresh connection unless client is given.
func do(t *testing.T, c *http.Client, method, url, authz string) (*http.Response, string, error) {
	t.Helper()
	if c == nil {
		c = &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 5 * time.Second}
	}
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Accept", strings.Join([]string{string(types.OCIImageIndex), string(types.OCIManifestSchema1), string(types.DockerManifestList), string(types.DockerManifestSchema2)}, ", "))
	if authz != "" {
		req.Header.Set("Authorization", authz)
	}
	resp, err := c.Do(req)
	if err != nil {
		return nil, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp, string(b), err
}

func status(t *testing.T, method, url string) int {
	t.Helper()
	resp, _, err := do(t, nil, method, url, "")
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	return resp.StatusCode
}

func TestPullLimit(t *testing.T) {
	r := start(t)
	img, err := r.PushPlatformImage(context.Background(), "lib/app", "v1", []int64{4 << 10}, 1, false)
	if err != nil {
		t.Fatal(err)
	}
	if got := r.ManifestGets() + r.ManifestHeads(); got != 0 {
		t.Fatalf("pushing counted %d manifest requests", got)
	}
	byTag := r.URL + "/v2/lib/app/manifests/v1"
	byDigest := r.URL + "/v2/lib/app/manifests/" + img.Digest
	r.SetManifestGetLimit(2)
	r.SetRetryAfter(42 * time.Second)
	for _, u := range []string{byTag, byDigest} {
		if c := status(t, "GET", u); c != 200 {
			t.Fatalf("GET %s under the limit: %d", u, c)
		}
		if c := status(t, "HEAD", u); c != 200 {
			t.Fatalf("HEAD %s: %d", u, c)
		}
	}
	resp, body, err := do(t, nil, "GET", byDigest, "")
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusTooManyRequests || resp.Header.Get("Retry-After") != "42" || body != TooManyRequestsBody {
		t.Fatalf("GET past the limit: %d, Retry-After %q, body %s", resp.StatusCode, resp.Header.Get("Retry-After"), body)
	}
	if got := resp.Header.Get("RateLimit-Remaining"); got != "0;w=21600" {
		t.Errorf("RateLimit-Remaining %q", got)
	}
	// HEADs stay free past the limit; blobs are not metered.
	if c := status(t, "HEAD", byTag); c != 200 {
		t.Errorf("HEAD past the limit: %d", c)
	}
	if c := status(t, "GET", r.URL+"/v2/lib/app/blobs/"+img.Layers[0].Digest); c != 200 {
		t.Errorf("blob GET past the limit: %d", c)
	}
	if g, h, n := r.ManifestGets(), r.ManifestHeads(), r.TooManyRequests(); g != 2 || h != 3 || n != 1 {
		t.Errorf("gets %d heads %d 429s %d, want 2 3 1", g, h, n)
	}
	if a, b := r.ManifestGetsOf("lib/app", "v1"), r.ManifestGetsOf("lib/app", img.Digest); a != 1 || b != 1 {
		t.Errorf("per manifest: by tag %d, by digest %d; want 1, 1", a, b)
	}
	if st := r.Stats(); st.ManifestGetsByClient["127.0.0.1"] != 2 || st.TooManyByClient["127.0.0.1"] != 1 {
		t.Errorf("by client: GETs %v, 429s %v", st.ManifestGetsByClient, st.TooManyByClient)
	}
	// Setting the limit again opens a new window; 0 lifts it.
	r.SetManifestGetLimit(1)
	if c := status(t, "GET", byTag); c != 200 {
		t.Errorf("GET in a new window: %d", c)
	}
	if c := status(t, "GET", byTag); c != 429 {
		t.Errorf("second GET in a window of 1: %d", c)
	}
	r.SetManifestGetLimit(0)
	if c := status(t, "GET", byTag); c != 200 {
		t.Errorf("GET without a limit: %d", c)
	}
	r.ResetCounters()
	if st := r.Stats(); st.ManifestGets != 0 || st.ManifestHeads != 0 || st.TooManyRequests != 0 || len(st.ManifestsByRef) != 0 {
		t.Errorf("after ResetCounters: %+v", st)
	}
}

func TestSetDownStill503(t *testing.T) {
	r := start(t)
	r.SetDown(true)
	if c := status(t, "GET", r.URL+"/v2/"); c != 503 {
		t.Errorf("down: %d", c)
	}
	r.SetDown(false)
	if c := status(t, "GET", r.URL+"/v2/"); c != 200 {
		t.Errorf("up: %d", c)
	}
}

func TestOutage(t *testing.T) {
	r := start(t)
	ping := r.URL + "/v2/"
	// A client holding a keep-alive connection from before the outage.
	pooled := &http.Client{Timeout: 2 * time.Second}
	if resp, _, err := do(t, pooled, "GET", ping, ""); err != nil || resp.StatusCode != 200 {
		t.Fatalf("before: %v", err)
	}

	if err := r.SetOutage(OutageRefuse); err != nil {
		t.Fatal(err)
	}
	_, _, err := do(t, nil, "GET", ping, "")
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("refuse: %v, want connection refused", err)
	}
	if _, _, err := do(t, pooled, "GET", ping, ""); err == nil {
		t.Error("refuse: a pooled connection from before the outage was served")
	}
	if err := r.SetOutage(OutageNone); err != nil {
		t.Fatal(err)
	}
	if c := status(t, "GET", ping); c != 200 {
		t.Fatalf("after refuse, on the same address: %d", c)
	}

	if err := r.SetOutage(OutageClose); err != nil {
		t.Fatal(err)
	}
	if _, _, err = do(t, nil, "GET", ping, ""); err == nil {
		t.Error("close: request answered")
	} else if errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("close: %v, want the connection accepted, then cut", err)
	}
	if r.OutageCuts() == 0 {
		t.Error("close: no connection counted as cut")
	}

	if err := r.SetOutage(OutageHang); err != nil {
		t.Fatal(err)
	}
	c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 300 * time.Millisecond}
	t0 := time.Now()
	if _, _, err := do(t, c, "GET", ping, ""); err == nil || !errors.Is(err, context.DeadlineExceeded) && !strings.Contains(err.Error(), "Timeout") {
		t.Errorf("hang: %v, want a timeout", err)
	}
	if time.Since(t0) < 250*time.Millisecond {
		t.Error("hang: answered before the client's timeout")
	}
	if err := r.SetOutage("flood"); err == nil {
		t.Error("unknown outage mode accepted")
	}
	if err := r.SetOutage(OutageNone); err != nil {
		t.Fatal(err)
	}
	if c := status(t, "GET", ping); c != 200 {
		t.Errorf("up again: %d", c)
	}
	// Close works in an outage, and a closed registry stays down.
	if err := r.SetOutage(OutageRefuse); err != nil {
		t.Fatal(err)
	}
	r.Close()
	if err := r.SetOutage(OutageNone); err == nil {
		t.Error("a closed registry came up again")
	}
}

func TestPushIndexAndMoveTag(t *testing.T) {
	r := start(t)
	ctx := context.Background()
	for _, docker := range []bool{false, true} {
		ix, err := r.PushIndexSpec(ctx, IndexSpec{Repo: "multi/app", Tag: "v1", Layers: []int64{8 << 10, 4 << 10}, Seed: 3, Docker: docker})
		if err != nil {
			t.Fatal(err)
		}
		if n := r.ManifestGets() + r.ManifestHeads(); n != 0 {
			t.Errorf("pushing an index counted %d manifest requests", n)
		}
		want := types.OCIImageIndex
		if docker {
			want = types.DockerManifestList
		}
		ref, _ := name.ParseReference(r.Host+"/multi/app:v1", name.Insecure)
		desc, err := remote.Get(ref)
		if err != nil {
			t.Fatal(err)
		}
		if desc.MediaType != want || desc.Digest.String() != ix.Digest || desc.Size != ix.Size {
			t.Fatalf("index: %s %s %d, want %s %s %d", desc.MediaType, desc.Digest, desc.Size, want, ix.Digest, ix.Size)
		}
		idx, err := desc.ImageIndex()
		if err != nil {
			t.Fatal(err)
		}
		im, _ := idx.IndexManifest()
		if len(im.Manifests) != 2 || len(ix.Manifests) != 2 {
			t.Fatalf("%d manifests in the index, %d reported", len(im.Manifests), len(ix.Manifests))
		}
		native := ix.Native()
		if native == nil || native.Platform != "linux/"+runtime.GOARCH {
			t.Fatalf("no native image in %+v", ix.Manifests)
		}
		seen := map[string]bool{}
		for k, m := range im.Manifests {
			got := ix.Manifests[k]
			if m.Digest.String() != got.Digest || m.Platform == nil || m.Platform.String() != got.Platform {
				t.Errorf("manifest %d: %s %v, reported %s %s", k, m.Digest, m.Platform, got.Digest, got.Platform)
			}
			img, err := idx.Image(m.Digest)
			if err != nil {
				t.Fatal(err)
			}
			cf, _ := img.ConfigFile()
			if cf.OS+"/"+cf.Architecture != got.Platform {
				t.Errorf("config of %s says %s/%s", got.Platform, cf.OS, cf.Architecture)
			}
			ls, _ := img.Layers()
			if len(ls) != 2 || got.LayerBytes() < 12<<10 {
				t.Errorf("%s: %d layers, %d bytes", got.Platform, len(ls), got.LayerBytes())
			}
			for _, l := range got.Layers {
				if seen[l.Digest] {
					t.Errorf("layer %s shared between platforms", l.Digest)
				}
				seen[l.Digest] = true
			}
		}
		if n := r.ManifestGetsOf("multi/app", "v1"); n != 1 {
			t.Errorf("%d GETs of the tag counted, want 1", n)
		}
		r.ResetCounters()
	}
	// Moving the tag: another image, then back to the first by digest.
	first, _ := r.PushIndex(ctx, "move/app", "latest", []int64{4 << 10}, 10)
	second, err := r.PushIndex(ctx, "move/app", "latest", []int64{4 << 10}, 11)
	if err != nil {
		t.Fatal(err)
	}
	if first.Digest == second.Digest {
		t.Fatal("two seeds, one digest")
	}
	head := func() string {
		resp, _, err := do(t, nil, "HEAD", r.URL+"/v2/move/app/manifests/latest", "")
		if err != nil {
			t.Fatal(err)
		}
		return resp.Header.Get("Docker-Content-Digest")
	}
	if got := head(); got != second.Digest {
		t.Errorf("after re-push: %s, want %s", got, second.Digest)
	}
	if err := r.MoveTag(ctx, "move/app", "latest", first.Digest); err != nil {
		t.Fatal(err)
	}
	if got := head(); got != first.Digest {
		t.Errorf("after MoveTag: %s, want %s", got, first.Digest)
	}
	if _, err := r.PushIndex(ctx, "x/y", "z", nil, 1, "linux/s390x"); err == nil && runtime.GOARCH != "s390x" {
		t.Error("an index without this machine's platform was pushed")
	}
	// Pushing goes past the knobs.
	r.SetOutage(OutageRefuse)
	r.SetManifestGetLimit(1)
	if _, err := r.PushIndex(ctx, "during/outage", "v1", []int64{1 << 10}, 12); err != nil {
		t.Errorf("push in an outage: %v", err)
	}
	r.SetOutage(OutageNone)
}

func TestRepoCredentials(t *testing.T) {
	r := start(t)
	ctx := context.Background()
	priv, err := r.PushIndex(ctx, "team/private", "v1", []int64{4 << 10}, 20)
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := r.PushIndex(ctx, "team/public", "v1", []int64{4 << 10}, 21)
	r.SetRepoCredentials("team/private", "alice", "wonderland")
	good := "Basic YWxpY2U6d29uZGVybGFuZA==" // alice:wonderland
	for _, u := range []string{
		r.URL + "/v2/team/private/manifests/v1",
		r.URL + "/v2/team/private/manifests/" + priv.Digest,
		r.URL + "/v2/team/private/blobs/" + priv.Native().Layers[0].Digest,
	} {
		resp, _, err := do(t, nil, "GET", u, "")
		if err != nil || resp.StatusCode != 401 || !strings.HasPrefix(resp.Header.Get("WWW-Authenticate"), "Basic") {
			t.Errorf("anonymous GET %s: %v %v", u, err, resp)
		}
		if resp, _, err := do(t, nil, "GET", u, "Basic bWFsbG9yeTpndWVzcw=="); err != nil || resp.StatusCode != 401 {
			t.Errorf("wrong credentials GET %s: %v", u, err)
		}
		if resp, _, err := do(t, nil, "GET", u, good); err != nil || resp.StatusCode != 200 {
			t.Errorf("authorized GET %s: %v %v", u, err, resp)
		}
	}
	if c := status(t, "GET", r.URL+"/v2/team/public/manifests/"+pub.Digest); c != 200 {
		t.Errorf("public repository: %d", c)
	}
	if c := status(t, "GET", r.URL+"/v2/"); c != 200 {
		t.Errorf("/v2/: %d", c)
	}
	if g := r.ManifestGets(); g != 3 {
		t.Errorf("%d manifest GETs counted, want 3 (refused ones are not)", g)
	}
	r.SetRepoCredentials("team/private", "", "")
	if c := status(t, "GET", r.URL+"/v2/team/private/manifests/v1"); c != 200 {
		t.Errorf("public again: %d", c)
	}
}

func TestControlHandler(t *testing.T) {
	r := start(t)
	ctl := httptest.NewServer(r.ControlHandler())
	defer ctl.Close()
	post := func(path string, q url.Values, out any) {
		t.Helper()
		resp, err := http.Post(ctl.URL+path+"?"+q.Encode(), "", nil)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if resp.StatusCode != 200 {
			b, _ := io.ReadAll(resp.Body)
			t.Fatalf("POST %s %v: %d %s", path, q, resp.StatusCode, b)
		}
		if out != nil {
			if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
				t.Fatal(err)
			}
		}
	}
	stats := func() Stats {
		t.Helper()
		resp, err := http.Get(ctl.URL + "/stats")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var st Stats
		if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
			t.Fatal(err)
		}
		return st
	}
	var ix Index
	post("/push", url.Values{"repo": {"c/app"}, "tag": {"v1"}, "layers": {"8KiB,4KiB"}, "seed": {"5"}}, &ix)
	if len(ix.Manifests) != 2 || ix.Native() == nil || len(ix.Native().Layers) != 2 || ix.Native().Layers[0].Size < 8<<10 {
		t.Fatalf("pushed %+v", ix)
	}
	var img Image
	post("/push", url.Values{"repo": {"c/single"}, "tag": {"v1"}, "format": {"docker-image"}}, &img)
	if img.MediaType != string(types.DockerManifestSchema2) || len(img.Layers) != 2 {
		t.Fatalf("pushed %+v", img)
	}
	post("/limit", url.Values{"n": {"1"}, "retry_after": {"7"}}, nil)
	status(t, "GET", r.URL+"/v2/c/app/manifests/v1")
	status(t, "HEAD", r.URL+"/v2/c/app/manifests/v1")
	resp, _, _ := do(t, nil, "GET", r.URL+"/v2/c/app/manifests/"+ix.Digest, "")
	if resp.StatusCode != 429 || resp.Header.Get("Retry-After") != "7" {
		t.Errorf("past the limit: %d %q", resp.StatusCode, resp.Header.Get("Retry-After"))
	}
	st := stats()
	if st.ManifestGets != 1 || st.ManifestHeads != 1 || st.TooManyRequests != 1 || st.ManifestsByRef["c/app:v1"] != 1 || st.Limit != 1 {
		t.Errorf("stats %+v", st)
	}
	post("/limit", url.Values{"n": {"0"}}, nil)
	post("/outage", url.Values{"mode": {"refuse"}}, nil)
	if _, _, err := do(t, nil, "GET", r.URL+"/v2/", ""); err == nil {
		t.Error("served while refusing")
	}
	if stats().Outage != "refuse" {
		t.Error("stats lack the outage")
	}
	post("/outage", url.Values{"mode": {""}}, nil)
	post("/tag", url.Values{"repo": {"c/app"}, "tag": {"v2"}, "digest": {ix.Digest}}, nil)
	resp, _, err := do(t, nil, "HEAD", r.URL+"/v2/c/app/manifests/v2", "")
	if err != nil || resp.Header.Get("Docker-Content-Digest") != ix.Digest {
		t.Errorf("tag v2: %v %v", err, resp)
	}
	post("/private", url.Values{"repo": {"c/app"}, "user": {"u"}, "pass": {"p"}}, nil)
	if c := status(t, "GET", r.URL+"/v2/c/app/manifests/v1"); c != 401 {
		t.Errorf("private: %d", c)
	}
	post("/down", url.Values{"on": {"true"}}, nil)
	if c := status(t, "GET", r.URL+"/v2/"); c != 503 {
		t.Errorf("down: %d", c)
	}
	var after Stats
	post("/reset", nil, &after)
	if after.ManifestGets != 0 || after.ManifestHeads != 0 || !after.Down {
		t.Errorf("after reset: %+v", after)
	}
	if resp, err := http.Post(ctl.URL+"/outage?mode=flood", "", nil); err != nil || resp.StatusCode != 400 {
		t.Errorf("bad mode: %v %v", err, resp)
	}
}

// Blob ranges as clients send them: closed, and open-ended as containerd
// sends one to resume a blob.
func TestBlobRange(t *testing.T) {
	r := start(t)
	blob := RandomBytes(1000, 5)
	d, err := r.PushBlob(context.Background(), "range/blob", blob)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		rng        string
		want       []byte
		wantStatus int
	}{
		{"", blob, http.StatusOK},
		{"bytes=10-19", blob[10:20], http.StatusPartialContent},
		{"bytes=600-", blob[600:], http.StatusPartialContent},
		{"bytes=0-", blob, http.StatusPartialContent},
	} {
		t.Run(tc.rng, func(t *testing.T) {
			req, _ := http.NewRequest(http.MethodGet, r.URL+"/v2/range/blob/blobs/"+d, nil)
			if tc.rng != "" {
				req.Header.Set("Range", tc.rng)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			got, err := io.ReadAll(resp.Body)
			if err != nil {
				t.Fatal(err)
			}
			if resp.StatusCode != tc.wantStatus || string(got) != string(tc.want) {
				t.Fatalf("Range %q: %s, %d bytes; want %d, %d bytes", tc.rng, resp.Status, len(got), tc.wantStatus, len(tc.want))
			}
		})
	}
}
