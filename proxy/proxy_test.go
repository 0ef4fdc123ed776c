package proxy_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/config"
	"github.com/registry-proxy/registry-proxy/internal/testregistry"
	"github.com/registry-proxy/registry-proxy/node"
	"github.com/registry-proxy/registry-proxy/piece"
)

type env struct {
	reg   *testregistry.Registry
	node  *node.Node
	base  string // http://proxy
	ns    string // ?ns=<registry>
	img   *testregistry.Image
	blob  []byte // content of img's last layer
	blobD string
}

func newEnv(t *testing.T, mut func(*config.Config)) *env {
	t.Helper()
	reg, err := testregistry.Start(testregistry.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close() })
	ctx := context.Background()
	// Layer sizes: a small one and one of several pieces.
	img, err := reg.PushImage(ctx, "library/app", "v1", []int64{1000, 3*piece.MinSize + 12345}, 1)
	if err != nil {
		t.Fatal(err)
	}
	cfg := config.Default()
	cfg.Listen = "127.0.0.1:0"
	cfg.Admin.Listen = "127.0.0.1:0" // not the default port: tests run side by side
	cfg.DataDir = t.TempDir()
	cfg.Upstream.Registries = map[string]string{"test.invalid": reg.URL}
	cfg.DefaultRegistry = "test.invalid"
	cfg.Upstream.Backoff = 10 * time.Millisecond
	if mut != nil {
		mut(&cfg)
	}
	lvl := slog.LevelWarn
	if testing.Verbose() {
		lvl = slog.LevelDebug
	}
	n, err := node.Start(ctx, cfg, slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl})))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Shutdown(context.Background()) })
	last := img.Layers[len(img.Layers)-1]
	tarb, _ := testregistry.LayerTar(3*piece.MinSize+12345, 1*1000+1)
	if digest.FromBytes(tarb).String() != last.Digest {
		t.Fatal("layer regeneration differs")
	}
	return &env{reg: reg, node: n, base: "http://" + n.Addr(), ns: "?ns=test.invalid", img: img, blob: tarb, blobD: last.Digest}
}

func (e *env) do(t *testing.T, method, path string, hdr map[string]string) (*http.Response, []byte) {
	t.Helper()
	req, _ := http.NewRequest(method, e.base+path, nil)
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: body: %v", method, path, err)
	}
	return resp, b
}

func errCode(b []byte) string {
	var body struct {
		Errors []struct{ Code string } `json:"errors"`
	}
	if json.Unmarshal(b, &body) != nil || len(body.Errors) == 0 {
		return ""
	}
	return body.Errors[0].Code
}

func TestRequests(t *testing.T) {
	e := newEnv(t, nil)
	zero := "sha256:" + strings.Repeat("0", 64)
	ociAccept := "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*"
	mid := piece.MinSize * 5 / 4 // inside the second piece
	tests := []struct {
		name    string
		method  string
		path    string
		hdr     map[string]string
		status  int
		code    string            // OCI error code
		headers map[string]string // expected response headers
		body    []byte
	}{
		{"base", "GET", "/v2/", nil, 200, "", map[string]string{"Docker-Distribution-API-Version": "registry/2.0"}, nil},
		{"manifest by tag HEAD", "HEAD", "/v2/library/app/manifests/v1" + e.ns, map[string]string{"Accept": ociAccept}, 200, "",
			map[string]string{"Docker-Content-Digest": e.img.Digest, "Content-Type": "application/vnd.oci.image.manifest.v1+json"}, nil},
		{"manifest by tag GET", "GET", "/v2/library/app/manifests/v1" + e.ns, map[string]string{"Accept": ociAccept}, 200, "",
			map[string]string{"Docker-Content-Digest": e.img.Digest, "Content-Type": "application/vnd.oci.image.manifest.v1+json"}, nil},
		{"manifest without ns uses default registry", "GET", "/v2/library/app/manifests/v1", nil, 200, "",
			map[string]string{"Docker-Content-Digest": e.img.Digest}, nil},
		{"manifest by digest", "GET", "/v2/library/app/manifests/" + e.img.Digest + e.ns, nil, 200, "",
			map[string]string{"Docker-Content-Digest": e.img.Digest}, nil},
		{"unknown tag", "GET", "/v2/library/app/manifests/nope" + e.ns, nil, 404, "MANIFEST_UNKNOWN", nil, nil},
		{"invalid tag", "GET", "/v2/library/app/manifests/-bad" + e.ns, nil, 404, "MANIFEST_UNKNOWN", nil, nil},
		{"invalid manifest digest", "GET", "/v2/library/app/manifests/sha256:abc" + e.ns, nil, 404, "MANIFEST_UNKNOWN", nil, nil},
		{"blob HEAD cold", "HEAD", "/v2/library/app/blobs/" + e.blobD + e.ns, nil, 200, "",
			map[string]string{"Content-Length": fmt.Sprint(len(e.blob)), "Docker-Content-Digest": e.blobD}, nil},
		{"blob range cold", "GET", "/v2/library/app/blobs/" + e.blobD + e.ns, map[string]string{"Range": fmt.Sprintf("bytes=%d-%d", mid, mid+99)}, 206, "",
			map[string]string{"Content-Range": fmt.Sprintf("bytes %d-%d/%d", mid, mid+99, len(e.blob)), "Content-Length": "100"}, e.blob[mid : mid+100]},
		{"blob GET", "GET", "/v2/library/app/blobs/" + e.blobD + e.ns, nil, 200, "",
			map[string]string{"Content-Length": fmt.Sprint(len(e.blob)), "Docker-Content-Digest": e.blobD, "Content-Type": "application/octet-stream"}, e.blob},
		{"blob GET warm", "GET", "/v2/library/app/blobs/" + e.blobD + e.ns, nil, 200, "",
			map[string]string{"X-Registry-Proxy-Source": "cache"}, e.blob},
		{"blob range warm, open end", "GET", "/v2/library/app/blobs/" + e.blobD + e.ns, map[string]string{"Range": fmt.Sprintf("bytes=%d-", len(e.blob)-10)}, 206, "",
			map[string]string{"Content-Range": fmt.Sprintf("bytes %d-%d/%d", len(e.blob)-10, len(e.blob)-1, len(e.blob))}, e.blob[len(e.blob)-10:]},
		{"blob range unsatisfiable", "GET", "/v2/library/app/blobs/" + e.blobD + e.ns, map[string]string{"Range": fmt.Sprintf("bytes=%d-", len(e.blob)+10)}, 416, "", nil, nil},
		{"unknown blob", "GET", "/v2/library/app/blobs/" + zero + e.ns, nil, 404, "BLOB_UNKNOWN", nil, nil},
		{"unknown blob HEAD", "HEAD", "/v2/library/app/blobs/" + zero + e.ns, nil, 404, "", nil, nil},
		{"bad digest", "GET", "/v2/library/app/blobs/sha256:xyz" + e.ns, nil, 400, "DIGEST_INVALID", nil, nil},
		{"unknown algorithm", "GET", "/v2/library/app/blobs/md5:d41d8cd98f00b204e9800998ecf8427e" + e.ns, nil, 400, "DIGEST_INVALID", nil, nil},
		{"bad name", "GET", "/v2/Library/App/blobs/" + e.blobD + e.ns, nil, 400, "NAME_INVALID", nil, nil},
		{"name too long", "GET", "/v2/" + strings.Repeat("a/", 130) + "b/blobs/" + e.blobD + e.ns, nil, 400, "NAME_INVALID", nil, nil},
		{"bad ns", "GET", "/v2/library/app/blobs/" + e.blobD + "?ns=a/b", nil, 404, "NAME_UNKNOWN", nil, nil},
		{"no debug on the mirror port: members", "GET", "/debug/members", nil, 404, "UNSUPPORTED", nil, nil},
		{"no debug on the mirror port: blobs", "GET", "/debug/blobs/" + e.blobD, nil, 404, "UNSUPPORTED", nil, nil},
		{"ns not allowed", "GET", "/v2/library/app/blobs/" + e.blobD + "?ns=127.0.0.1:22", nil, 404, "NAME_UNKNOWN", nil, nil},
		{"ns metadata address", "GET", "/v2/library/app/manifests/latest?ns=169.254.169.254", nil, 404, "NAME_UNKNOWN", nil, nil},
		{"push upload", "POST", "/v2/library/app/blobs/uploads/" + e.ns, nil, 405, "UNSUPPORTED", nil, nil},
		{"push manifest", "PUT", "/v2/library/app/manifests/v2" + e.ns, nil, 405, "UNSUPPORTED", nil, nil},
		{"delete blob", "DELETE", "/v2/library/app/blobs/" + e.blobD + e.ns, nil, 405, "UNSUPPORTED", nil, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if strings.Contains(tt.name, "warm") {
				// The cold response ends once the digest matched; the blob is
				// committed (fsync, rename) right after.
				deadline := time.Now().Add(5 * time.Second)
				for _, err := e.node.Store().Stat(digest.Digest(e.blobD)); err != nil; _, err = e.node.Store().Stat(digest.Digest(e.blobD)) {
					if time.Now().After(deadline) {
						t.Fatalf("blob not committed: %v", err)
					}
					time.Sleep(5 * time.Millisecond)
				}
			}
			resp, body := e.do(t, tt.method, tt.path, tt.hdr)
			if resp.StatusCode != tt.status {
				t.Fatalf("status %d, want %d; body %.200q", resp.StatusCode, tt.status, body)
			}
			if tt.code != "" && errCode(body) != tt.code {
				t.Errorf("error code %q, want %q (body %s)", errCode(body), tt.code, body)
			}
			for k, v := range tt.headers {
				if got := resp.Header.Get(k); got != v {
					t.Errorf("header %s = %q, want %q", k, got, v)
				}
			}
			if tt.body != nil && string(body) != string(tt.body) {
				t.Errorf("body differs: %d bytes, want %d", len(body), len(tt.body))
			}
			if tt.method == "HEAD" && len(body) != 0 {
				t.Errorf("HEAD returned %d body bytes", len(body))
			}
		})
	}
	// HEAD never downloads, and one cold GET plus a cold range fetched each
	// piece once.
	if got, want := e.reg.BytesOf(e.blobD), int64(len(e.blob)); got != want {
		t.Errorf("upstream sent %d bytes of the blob, want exactly %d", got, want)
	}
}

func TestConcurrentColdClients(t *testing.T) {
	e := newEnv(t, nil)
	const clients = 200
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := http.Get(e.base + "/v2/library/app/blobs/" + e.blobD + e.ns)
			if err != nil {
				errs <- err
				return
			}
			defer resp.Body.Close()
			v := digest.Digest(e.blobD).Verifier()
			if _, err := io.Copy(v, resp.Body); err != nil || resp.StatusCode != 200 || !v.Verified() {
				errs <- fmt.Errorf("status %d, err %v, verified %v", resp.StatusCode, err, v.Verified())
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	plan := piece.PlanFor(int64(len(e.blob)))
	if got := e.reg.BytesOf(e.blobD); got != int64(len(e.blob)) {
		t.Errorf("upstream sent %d bytes, want exactly one copy (%d)", got, len(e.blob))
	}
	if got := e.reg.BlobGets(); got != int64(plan.Count()) {
		t.Errorf("upstream answered %d blob GETs, want one per piece (%d)", got, plan.Count())
	}
}

func TestUpstreamFaults(t *testing.T) {
	tests := []struct {
		name  string
		cfg   func(*config.Config)
		fault func(*testregistry.Registry)
		check func(t *testing.T, e *env)
	}{
		{"down: cold blob is 502", nil, func(r *testregistry.Registry) { r.SetDown(true) }, func(t *testing.T, e *env) {
			resp, body := e.do(t, "GET", "/v2/library/app/blobs/"+e.blobD+e.ns, nil)
			if resp.StatusCode != 502 || errCode(body) != "UNAVAILABLE" {
				t.Fatalf("status %d body %s", resp.StatusCode, body)
			}
			resp, _ = e.do(t, "GET", "/v2/library/app/manifests/v1"+e.ns, nil)
			if resp.StatusCode != 502 {
				t.Fatalf("manifest by tag: status %d", resp.StatusCode)
			}
		}},
		{"ignores Range: streamed whole", nil, func(r *testregistry.Registry) { r.SetIgnoreRange(true) }, func(t *testing.T, e *env) {
			resp, body := e.do(t, "GET", "/v2/library/app/blobs/"+e.blobD+e.ns, nil)
			if resp.StatusCode != 200 || string(body) != string(e.blob) {
				t.Fatalf("status %d, %d bytes", resp.StatusCode, len(body))
			}
		}},
		{"redirects: target reused", func(c *config.Config) { c.Pieces.Concurrency = 1 }, func(r *testregistry.Registry) { r.SetRedirect(true) }, func(t *testing.T, e *env) {
			resp, body := e.do(t, "GET", "/v2/library/app/blobs/"+e.blobD+e.ns, nil)
			if resp.StatusCode != 200 || string(body) != string(e.blob) {
				t.Fatalf("status %d, %d bytes", resp.StatusCode, len(body))
			}
			pieces := int64(piece.PlanFor(int64(len(e.blob))).Count())
			if n := e.reg.Redirects(); n != 1 || pieces < 2 {
				t.Fatalf("%d redirects for %d pieces: target not reused", n, pieces)
			}
		}},
		{"corrupt bytes: aborted, not stored", nil, func(r *testregistry.Registry) { r.SetCorrupt(true) }, func(t *testing.T, e *env) {
			resp, err := http.Get(e.base + "/v2/library/app/blobs/" + e.blobD + e.ns)
			if err == nil {
				b, rerr := io.ReadAll(resp.Body)
				resp.Body.Close()
				if rerr == nil && resp.StatusCode == 200 {
					t.Fatalf("bad blob ended cleanly (%d bytes)", len(b))
				}
			}
			if _, err := e.node.Store().Stat(digest.Digest(e.blobD)); err == nil {
				t.Fatal("corrupt blob stored")
			}
			// Upstream mended: the next pull succeeds.
			e.reg.SetCorrupt(false)
			resp2, body := e.do(t, "GET", "/v2/library/app/blobs/"+e.blobD+e.ns, nil)
			if resp2.StatusCode != 200 || string(body) != string(e.blob) {
				t.Fatalf("after repair: status %d, %d bytes", resp2.StatusCode, len(body))
			}
		}},
		{"range of corrupt bytes during the download: never a clean 206", nil, func(r *testregistry.Registry) { r.SetCorrupt(true) }, func(t *testing.T, e *env) {
			// The first piece whole: the upstream flips a byte in it. The range
			// is complete long before the blob is, but must not end cleanly
			// until the blob has matched its digest, which it never does.
			req, _ := http.NewRequest("GET", e.base+"/v2/library/app/blobs/"+e.blobD+e.ns, nil)
			req.Header.Set("Range", fmt.Sprintf("bytes=0-%d", piece.MinSize-1))
			resp, err := http.DefaultClient.Do(req)
			if err == nil {
				b, rerr := io.ReadAll(resp.Body)
				resp.Body.Close()
				if rerr == nil && resp.StatusCode == http.StatusPartialContent {
					t.Fatalf("range of a corrupt blob ended cleanly (%d bytes, equal to the blob's: %v)", len(b), string(b) == string(e.blob[:piece.MinSize]))
				}
			}
		}},
		{"auth: 401 passed back with challenge, token forwarded", nil, func(r *testregistry.Registry) { r.SetToken("s3cret") }, func(t *testing.T, e *env) {
			for _, p := range []string{"/v2/", "/v2/library/app/manifests/v1" + e.ns, "/v2/library/app/blobs/" + e.blobD + e.ns} {
				resp, body := e.do(t, "GET", p, nil)
				if resp.StatusCode != 401 || !strings.Contains(resp.Header.Get("WWW-Authenticate"), `realm="`+e.reg.URL+`/token"`) {
					t.Fatalf("%s: status %d, challenge %q, body %s", p, resp.StatusCode, resp.Header.Get("WWW-Authenticate"), body)
				}
				resp, _ = e.do(t, "GET", p, map[string]string{"Authorization": "Bearer s3cret"})
				if resp.StatusCode != 200 {
					t.Fatalf("%s with token: status %d", p, resp.StatusCode)
				}
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, tt.cfg)
			tt.fault(e.reg)
			tt.check(t, e)
		})
	}
}

func TestUpstreamTimeout(t *testing.T) {
	// An upstream that accepts connections and never answers.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()
	e := newEnv(t, func(c *config.Config) {
		c.Upstream.Registries["hang.invalid"] = "http://" + ln.Addr().String()
		c.Upstream.Timeout = 500 * time.Millisecond
	})
	start := time.Now()
	resp, body := e.do(t, "GET", "/v2/library/app/manifests/v1?ns=hang.invalid", nil)
	if resp.StatusCode != 504 || errCode(body) != "UNAVAILABLE" {
		t.Fatalf("status %d body %s", resp.StatusCode, body)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("took %v", d)
	}
}

func TestManifestServedFromCacheWhenUpstreamDown(t *testing.T) {
	e := newEnv(t, nil)
	resp, want := e.do(t, "GET", "/v2/library/app/manifests/v1"+e.ns, nil)
	if resp.StatusCode != 200 {
		t.Fatal(resp.Status)
	}
	e.reg.SetDown(true)
	resp, got := e.do(t, "GET", "/v2/library/app/manifests/"+e.img.Digest+e.ns, nil)
	if resp.StatusCode != 200 || string(got) != string(want) || resp.Header.Get("Content-Type") != "application/vnd.oci.image.manifest.v1+json" {
		t.Fatalf("status %d type %q", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
}
