package proxy_test

import (
	"bytes"
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/config"
	"github.com/registry-proxy/registry-proxy/internal/testregistry"
)

// A GET by tag costs the registry a HEAD and one GET by digest, once: the
// second client is served from the store. The HEAD of a tag stays a HEAD.
func TestManifestByTagGetsOnce(t *testing.T) {
	e := newEnv(t, nil)
	e.reg.ResetCounters()
	accept := map[string]string{"Accept": "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"}
	for i := range 3 {
		resp, body := e.do(t, "GET", "/v2/library/app/manifests/v1"+e.ns, accept)
		if resp.StatusCode != 200 || resp.Header.Get("Docker-Content-Digest") != e.img.Digest || digest.FromBytes(body).String() != e.img.Digest {
			t.Fatalf("GET %d by tag: %d %s", i, resp.StatusCode, resp.Header.Get("Docker-Content-Digest"))
		}
	}
	resp, _ := e.do(t, "HEAD", "/v2/library/app/manifests/v1"+e.ns, accept)
	if resp.StatusCode != 200 || resp.Header.Get("Docker-Content-Digest") != e.img.Digest {
		t.Fatalf("HEAD by tag: %d", resp.StatusCode)
	}
	if g, h := e.reg.ManifestGets(), e.reg.ManifestHeads(); g != 1 || h != 4 {
		t.Fatalf("registry: %d manifest GETs, %d HEADs; want 1 GET (the digest, once) and a HEAD a resolution", g, h)
	}
	if n := e.reg.ManifestGetsOf("library/app", "v1"); n != 0 {
		t.Fatalf("the tag itself was GET %d times", n)
	}
}

// While the registry cannot answer, a tag this node resolved before is
// answered from that resolution, marked stale; a tag it never resolved is
// the registry's failure, at once; with stale_if_error off, so are both.
func TestTagWhileRegistryDown(t *testing.T) {
	for _, mode := range []string{testregistry.OutageRefuse, testregistry.OutageClose} {
		t.Run(mode, func(t *testing.T) {
			e := newEnv(t, nil)
			off := newEnv(t, func(c *config.Config) { c.Manifests.StaleIfError = 0 })
			for _, env := range []*env{e, off} {
				if resp, _ := env.do(t, "GET", "/v2/library/app/manifests/v1"+env.ns, nil); resp.StatusCode != 200 {
					t.Fatalf("GET while up: %d", resp.StatusCode)
				}
				if err := env.reg.SetOutage(mode); err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { env.reg.SetOutage(testregistry.OutageNone) })
			}
			resp, _ := e.do(t, "HEAD", "/v2/library/app/manifests/v1"+e.ns, nil)
			if resp.StatusCode != 200 || resp.Header.Get("Docker-Content-Digest") != e.img.Digest || !strings.Contains(resp.Header.Get("X-Registry-Proxy-Stale"), "reason=unavailable") {
				t.Fatalf("HEAD while down: %d, digest %q, stale %q", resp.StatusCode, resp.Header.Get("Docker-Content-Digest"), resp.Header.Get("X-Registry-Proxy-Stale"))
			}
			resp, body := e.do(t, "GET", "/v2/library/app/manifests/v1"+e.ns, nil)
			if resp.StatusCode != 200 || digest.FromBytes(body).String() != e.img.Digest {
				t.Fatalf("GET while down: %d", resp.StatusCode)
			}
			if resp, body := e.do(t, "GET", "/v2/library/app/blobs/"+e.blobD+e.ns, nil); resp.StatusCode != 200 || !bytes.Equal(body, e.blob) {
				// Not cached: the blob itself needs the registry.
				t.Logf("uncached blob while down: %d (expected without peers)", resp.StatusCode)
			}
			start := time.Now()
			if resp, _ := e.do(t, "HEAD", "/v2/library/app/manifests/never"+e.ns, nil); resp.StatusCode < 500 {
				t.Fatalf("a tag never resolved, while down: %d", resp.StatusCode)
			}
			if took := time.Since(start); took > 10*time.Second {
				t.Fatalf("a tag never resolved took %v to fail", took)
			}
			if resp, _ := off.do(t, "HEAD", "/v2/library/app/manifests/v1"+off.ns, nil); resp.StatusCode < 500 || resp.Header.Get("X-Registry-Proxy-Stale") != "" {
				t.Fatalf("stale_if_error = 0, while down: %d %q", resp.StatusCode, resp.Header.Get("X-Registry-Proxy-Stale"))
			}
			if m := metric(t, e, `registry_proxy_stale_answers_total{kind="tag",reason="unavailable"}`); m == "" || strings.HasSuffix(m, " 0") {
				t.Fatalf("stale answers not counted: %q", m)
			}
		})
	}
}

// A 429 is passed on with its Retry-After and not retried; until that runs
// out no manifest GET goes to the registry (HEADs still do), and a tag is
// answered from the last resolution.
func TestRateLimitHonoured(t *testing.T) {
	e := newEnv(t, nil)
	ctx := context.Background()
	img2, err := e.reg.PushImage(ctx, "library/other", "v1", []int64{1000}, 9)
	if err != nil {
		t.Fatal(err)
	}
	if resp, _ := e.do(t, "GET", "/v2/library/app/manifests/v1"+e.ns, nil); resp.StatusCode != 200 {
		t.Fatalf("GET while under the limit: %d", resp.StatusCode)
	}
	e.reg.SetRetryAfter(time.Hour)
	limitAll(t, e) // every GET from now on is past the limit
	resp, _ := e.do(t, "GET", "/v2/library/other/manifests/"+img2.Digest+e.ns, nil)
	if resp.StatusCode != http.StatusTooManyRequests || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("a GET past the limit: %d, Retry-After %q", resp.StatusCode, resp.Header.Get("Retry-After"))
	}
	refused := e.reg.TooManyRequests()
	for range 3 {
		if resp, _ := e.do(t, "GET", "/v2/library/other/manifests/"+img2.Digest+e.ns, nil); resp.StatusCode != http.StatusTooManyRequests {
			t.Fatalf("within Retry-After: %d", resp.StatusCode)
		}
	}
	if n := e.reg.TooManyRequests(); n != refused || refused != 1 {
		t.Fatalf("the registry refused %d GETs; want 1, the rest held back here", n)
	}
	// By tag: the HEAD still goes, and the manifest is served from the store.
	if resp, _ := e.do(t, "GET", "/v2/library/app/manifests/v1"+e.ns, nil); resp.StatusCode != 200 {
		t.Fatalf("a cached image by tag while rate limited: %d", resp.StatusCode)
	}
}

// limitAll sets a limit every GET is past.
func limitAll(t *testing.T, e *env) {
	t.Helper()
	e.reg.SetManifestGetLimit(1)
	for e.reg.TooManyRequests() == 0 {
		req, _ := http.NewRequest("GET", e.reg.URL+"/v2/library/app/manifests/v1", nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
	}
	e.reg.ResetCounters()
}
