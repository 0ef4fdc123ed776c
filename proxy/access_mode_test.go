package proxy_test

import (
	"bytes"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/registry-proxy/registry-proxy/config"
)

// metric returns the admin /metrics line starting with prefix, "" if none.
func metric(t *testing.T, e *env, prefix string) string {
	t.Helper()
	resp, err := http.Get("http://" + e.node.AdminAddr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, prefix) {
			return l
		}
	}
	return ""
}

// A registry with basic auth; the node holds credentials for it. In access
// mode node a client without credentials (as kubelet's pulls reach a
// mirror) reads the manifest and the blob, cold and cached, and what it
// sends is not passed on; in client mode it gets the registry's challenge
// at once, and the refusal is counted.
func TestAccessModes(t *testing.T) {
	for _, tt := range []struct {
		mode       string
		served     bool
		refusedFor string // the refusals metric's labels
	}{
		{"node", true, ""},
		{"client", false, `mode="client",reason="no_credentials"`},
	} {
		t.Run(tt.mode, func(t *testing.T) {
			pw := filepath.Join(t.TempDir(), "password")
			if err := os.WriteFile(pw, []byte("wonderland\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			e := newEnv(t, func(c *config.Config) {
				c.Upstream.Credentials["test.invalid"] = config.Credential{Username: "alice", PasswordFile: pw}
				c.Access.Registries["test.invalid"] = config.RegistryAccess{Mode: tt.mode, Repositories: []string{"library/**"}}
			})
			e.reg.SetCredentials("alice", "wonderland")
			for _, step := range []struct {
				name, method, path string
				hdr                map[string]string
			}{
				{"tag HEAD", "HEAD", "/v2/library/app/manifests/v1", nil},
				{"manifest", "GET", "/v2/library/app/manifests/" + e.img.Digest, nil},
				{"blob cold", "GET", "/v2/library/app/blobs/" + e.blobD, nil},
				{"blob cached", "GET", "/v2/library/app/blobs/" + e.blobD, nil},
				{"blob cached, anonymous token", "GET", "/v2/library/app/blobs/" + e.blobD, map[string]string{"Authorization": "Bearer anonymous"}},
				{"blob HEAD", "HEAD", "/v2/library/app/blobs/" + e.blobD, nil},
			} {
				resp, body := e.do(t, step.method, step.path+e.ns, step.hdr)
				if tt.served {
					if resp.StatusCode != 200 {
						t.Fatalf("%s: %d %s", step.name, resp.StatusCode, body)
					}
					if step.method == "GET" && strings.Contains(step.path, "/blobs/") && !bytes.Equal(body, e.blob) {
						t.Fatalf("%s: wrong bytes", step.name)
					}
					continue
				}
				if resp.StatusCode != 401 || resp.Header.Get("WWW-Authenticate") == "" {
					t.Fatalf("%s: %d (challenge %q), want 401 with the registry's challenge", step.name, resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
				}
			}
			// Outside the repositories the mode applies to, the client's own
			// credentials decide.
			if resp, _ := e.do(t, "GET", "/v2/other/app/manifests/v1"+e.ns, nil); resp.StatusCode != 401 {
				t.Errorf("a repository outside the patterns: %d, want 401", resp.StatusCode)
			}
			got := metric(t, e, "registry_proxy_private_refusals_total{"+tt.refusedFor)
			if tt.refusedFor != "" && (got == "" || strings.HasSuffix(got, " 0")) {
				t.Errorf("refusals not counted: %q", got)
			}
			if tt.served && metric(t, e, `registry_proxy_private_refusals_total{mode="node"`) != "" {
				t.Errorf("node mode counted a refusal of what it served: %q", metric(t, e, `registry_proxy_private_refusals_total{mode="node"`))
			}
		})
	}
}
