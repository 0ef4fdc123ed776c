package integration

import (
	"context"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
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
	"github.com/registry-proxy/registry-proxy/piece"
)

func TestCLI(t *testing.T) {
	bad := filepath.Join(t.TempDir(), "bad.toml")
	os.WriteFile(bad, []byte("[pieces]\nconcurency = 3\n"), 0o644)
	halfTLS := filepath.Join(t.TempDir(), "tls.toml")
	os.WriteFile(halfTLS, []byte("[p2p.tls]\nca = \"/etc/ca.crt\"\n"), 0o644)
	dryDir := t.TempDir()
	brokenJSON := filepath.Join(t.TempDir(), "daemon.json")
	os.WriteFile(brokenJSON, []byte("{"), 0o644)
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
		{[]string{"containerd-config", "--dry-run", "--config-path", dryDir, "--containerd-config", "/nonexistent.toml"}, 0, `[host."http://127.0.0.1:5000"]`},
		{[]string{"docker-config", "--dry-run", "--daemon-json", "/nonexistent/daemon.json", "--mirror", "http://m:5000"}, 0, `"http://m:5000"`},
		{[]string{"docker-config", "--daemon-json", brokenJSON}, 1, "daemon.json"},
		{[]string{"containerd-config", "--registry", "../etc", "--config-path", dryDir}, 2, "want a host"},
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
			if len(tt.args) > 0 && tt.args[0] == "containerd-config" && tt.code == 0 {
				if entries, _ := os.ReadDir(dryDir); len(entries) != 0 {
					t.Errorf("--dry-run wrote %d entries", len(entries))
				}
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
	// (2) pieces more than one copy.
	if total > size+2*piece.PlanFor(size).PieceSize {
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

var killSeed = flag.Uint64("kill-seed", 0, "seed of TestKillNineLoop's kill points (0: from the clock)")

// kill -9 at seeded random points of several ingests at once, in a loop:
// after every crash each committed blob still matches its digest, no
// temporary file is left, partial downloads resume, and at the end every
// blob and manifest is served right.
func TestKillNineLoop(t *testing.T) {
	reg := startRegistry(t)
	img, err := reg.PushImage(context.Background(), "crash/app", "v1", []int64{3 << 20, 24 << 20, 40 << 20}, 77)
	if err != nil {
		t.Fatal(err)
	}
	var total int64
	for _, l := range img.Layers {
		total += l.Size
	}
	reg.ResetCounters()
	seed := *killSeed
	if seed == 0 {
		seed = uint64(time.Now().UnixNano())
	}
	rng := rand.New(rand.NewPCG(seed, 1))
	t.Logf("seed %d (kill points derive from it; -kill-seed repeats them)", seed)
	dataDir := t.TempDir()
	cfg := writeTOML(t, "[pieces]\nconcurrency = 4\n")
	args := []string{"--config", cfg, "--upstream", "crash.invalid=" + reg.URL}
	urls := []string{"/v2/crash/app/manifests/" + img.Digest}
	for _, l := range img.Layers {
		urls = append(urls, "/v2/crash/app/blobs/"+l.Digest)
	}
	reg.SetPace(24 << 20)
	const rounds = 5
	for round := 0; round < rounds; round++ {
		px := startProxy(t, dataDir, args...)
		ctx, cancel := context.WithCancel(context.Background())
		for _, u := range urls {
			go getBlob(ctx, "http://"+px.Addr+u+"?ns=crash.invalid")
		}
		// Kill once the upstream has sent a random share of what is left.
		target := reg.BlobBytes() + int64(rng.Float64()*0.3*float64(total))
		deadline := time.Now().Add(30 * time.Second)
		for reg.BlobBytes() < target && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		px.cmd.Process.Signal(syscall.SIGKILL)
		<-px.done
		cancel()
		checkStore(t, dataDir)
		t.Logf("round %d: killed after %d upstream bytes", round, reg.BlobBytes())
	}
	reg.SetPace(0)
	px := startProxy(t, dataDir, args...)
	for i, l := range img.Layers {
		if _, err := fetchVerified("http://"+px.Addr+urls[i+1]+"?ns=crash.invalid", l.Digest); err != nil {
			t.Fatalf("layer %d after %d crashes: %v", i, rounds, err)
		}
	}
	resp, err := http.Get("http://" + px.Addr + urls[0] + "?ns=crash.invalid")
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("manifest after the crashes: %v %v", resp, err)
	}
	resp.Body.Close()
	if !strings.Contains(px.output(), "resumed partial blob") && reg.BlobBytes() > total {
		t.Log("no partial was resumed in this run's last start")
	}
	t.Logf("upstream sent %d bytes for %d bytes of blobs over %d crashes", reg.BlobBytes(), total, rounds)
	px.stopProxy()
	checkStore(t, dataDir)
}

// checkStore checks a stopped proxy's data directory: every complete blob
// matches its name, and no temporary file is left outside ingest/.
func checkStore(t *testing.T, dir string) {
	t.Helper()
	filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(dir, path)
		if strings.HasPrefix(d.Name(), ".tmp-") {
			// Manifests' temporaries are swept when the store opens.
			if !strings.HasPrefix(rel, "manifests") {
				t.Errorf("temporary file left: %s", rel)
			}
			return nil
		}
		if strings.HasPrefix(rel, "blobs"+string(filepath.Separator)) {
			f, err := os.Open(path)
			if err != nil {
				t.Error(err)
				return nil
			}
			defer f.Close()
			dg := digest.Canonical.Digester()
			io.Copy(dg.Hash(), f)
			if dg.Digest().Encoded() != d.Name() {
				t.Errorf("committed blob %s holds %s", rel, dg.Digest())
			}
		}
		return nil
	})
}
