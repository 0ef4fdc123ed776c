package integration

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/internal/testregistry"
)

func TestCLI(t *testing.T) {
	bad := filepath.Join(t.TempDir(), "bad.toml")
	os.WriteFile(bad, []byte("[pieces]\nconcurency = 3\n"), 0o644)
	halfTLS := filepath.Join(t.TempDir(), "tls.toml")
	os.WriteFile(halfTLS, []byte("[p2p.tls]\nca = \"/etc/ca.crt\"\n"), 0o644)
	shortSecret := filepath.Join(t.TempDir(), "short")
	os.WriteFile(shortSecret, []byte("tooshort\n"), 0o600)
	tests := []struct {
		args []string
		code int
		want string
	}{
		{[]string{"version"}, 0, "registry-proxy "},
		{[]string{}, 2, "no command"},
		{[]string{"frobnicate"}, 2, `unknown command "frobnicate"`},
		{[]string{"serve", "--bogus"}, 2, "flag provided but not defined: -bogus"},
		{[]string{"serve", "--upstream", "nourl"}, 2, "want NAME=URL"},
		{[]string{"serve", "--log-level", "loud"}, 2, "log.level"},
		{[]string{"serve", "--config", bad}, 2, "unknown keys: pieces.concurency"},
		{[]string{"serve", "--config", "/nonexistent.toml"}, 2, "no such file"},
		{[]string{"serve", "--peer-listen", "127.0.0.1:1"}, 2, "p2p.secret_file"},
		{[]string{"serve", "--peer-listen", "127.0.0.1:1", "--cluster-secret", "/nonexistent-secret"}, 2, "cluster secret"},
		{[]string{"serve", "--peer-listen", "127.0.0.1:1", "--cluster-secret", shortSecret}, 2, "at least 16"},
		{[]string{"secret"}, 0, ""},
		{[]string{"serve", "--peer-listen", "127.0.0.1:1", "--config", halfTLS}, 2, "p2p.tls: set ca, cert and key together"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			out, err := exec.Command(*proxyBin, tt.args...).CombinedOutput()
			code := 0
			if ee, ok := err.(*exec.ExitError); ok {
				code = ee.ExitCode()
			}
			if code != tt.code || !strings.Contains(string(out), tt.want) {
				t.Fatalf("exit %d, output %q; want exit %d and %q", code, out, tt.code, tt.want)
			}
			if tt.code == 2 && len(tt.args) > 0 && tt.args[0] == "serve" && strings.Count(strings.TrimSpace(string(out)), "\n") > 0 {
				t.Errorf("error is not one line: %q", out)
			}
		})
	}
}

func getBlob(ctx context.Context, url string) (int64, digest.Digest, error) {
	req, _ := http.NewRequestWithContext(ctx, "GET", url, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return 0, "", fmt.Errorf("status %s", resp.Status)
	}
	dg := digest.Canonical.Digester()
	n, err := io.Copy(dg.Hash(), resp.Body)
	return n, dg.Digest(), err
}

// A crash mid-download keeps the pieces already written; the restarted proxy
// re-checks them, fetches only the rest, and keeps complete blobs.
func TestCrashResumesPartialBlob(t *testing.T) {
	reg := startRegistry(t)
	const size = 64 << 20
	d, err := reg.PushBlob(context.Background(), "crash/blob", testregistry.RandomBytes(size, 99))
	if err != nil {
		t.Fatal(err)
	}
	reg.SetPace(16 << 20) // 16 MiB/s a connection: about 2 s at 2 pieces at once
	cfg := filepath.Join(t.TempDir(), "c.toml")
	os.WriteFile(cfg, []byte("[pieces]\nconcurrency = 2\n"), 0o644)
	dataDir := t.TempDir()
	args := []string{"--config", cfg, "--upstream", "crash.invalid=" + reg.URL}
	px := startProxy(t, dataDir, args...)
	url := func(p *proxy) string { return "http://" + p.Addr + "/v2/crash/blob/blobs/" + d + "?ns=crash.invalid" }

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go getBlob(ctx, url(px))
	deadline := time.Now().Add(30 * time.Second)
	for reg.BlobBytes() < size/2 {
		if time.Now().After(deadline) {
			t.Fatalf("upstream sent only %d bytes", reg.BlobBytes())
		}
		time.Sleep(20 * time.Millisecond)
	}
	px.cmd.Process.Signal(syscall.SIGKILL)
	<-px.done
	cancel()
	first := reg.BlobBytes()
	if _, err := os.Stat(filepath.Join(dataDir, "ingest")); err != nil {
		t.Fatal(err)
	}

	reg.SetPace(0)
	px2 := startProxy(t, dataDir, args...)
	n, got, err := getBlob(context.Background(), url(px2))
	if err != nil || n != size || got.String() != d {
		t.Fatalf("after restart: %d bytes, digest %s, err %v", n, got, err)
	}
	total := reg.BlobBytes()
	// Pieces in flight at the crash are fetched again: at most concurrency
	// (2) pieces of 4 MiB more than one copy.
	if total > size+2*(4<<20) {
		t.Errorf("upstream sent %d bytes in all (%d before the crash); resume refetched too much", total, first)
	}
	if !strings.Contains(px2.output(), "resumed partial blob") {
		t.Error("no resume logged")
	}
	px2.stopProxy()

	// Complete blobs survive a restart: no upstream bytes at all.
	reg.ResetCounters()
	px3 := startProxy(t, dataDir, args...)
	if n, got, err := getBlob(context.Background(), url(px3)); err != nil || n != size || got.String() != d {
		t.Fatalf("after second restart: %d bytes, %s, %v", n, got, err)
	}
	if b := reg.BlobBytes(); b != 0 {
		t.Errorf("complete blob refetched after restart: %d upstream bytes", b)
	}
}
