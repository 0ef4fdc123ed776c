package credprovider

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/registry-proxy/registry-proxy/metrics"
	"github.com/registry-proxy/registry-proxy/proxy/upstream"
)

// plugin is internal/credplugin built once per test binary (tests run
// -count times in one process).
var plugin struct {
	once sync.Once
	dir  string
	path string
	err  error
}

func TestMain(m *testing.M) {
	code := m.Run()
	if plugin.dir != "" {
		os.RemoveAll(plugin.dir)
	}
	os.Exit(code)
}

// buildPlugin builds internal/credplugin, skipping the test without a Go
// toolchain.
func buildPlugin(t *testing.T) string {
	t.Helper()
	plugin.once.Do(func() {
		goBin, err := exec.LookPath("go")
		if err != nil {
			plugin.err = err
			return
		}
		plugin.dir, plugin.err = os.MkdirTemp("", "credplugin")
		if plugin.err != nil {
			return
		}
		plugin.path = filepath.Join(plugin.dir, "credplugin")
		out, err := exec.Command(goBin, "build", "-o", plugin.path, "github.com/registry-proxy/registry-proxy/internal/credplugin").CombinedOutput()
		if err != nil {
			plugin.err = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if errors.Is(plugin.err, exec.ErrNotFound) {
		t.Skip("no go toolchain to build the plugin")
	}
	if plugin.err != nil {
		t.Fatal(plugin.err)
	}
	return plugin.path
}

type execFixture struct {
	c       *Providers
	logs    *syncBuffer
	metrics *metrics.Metrics
}

// newExec is Providers running bin (linked into a plugin directory as
// provider "p") with args and env, for images of 127.0.0.1:5000.
func newExec(t *testing.T, bin string, timeout time.Duration, args []string, env map[string]string) *execFixture {
	t.Helper()
	dir := t.TempDir()
	if err := os.Symlink(bin, filepath.Join(dir, "p")); err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n- name: p\n  matchImages: [\"127.0.0.1:5000\"]\n  defaultCacheDuration: 1h\n  apiVersion: %s\n  args:\n", v1)
	for _, a := range args {
		fmt.Fprintf(&b, "  - %q\n", a)
	}
	b.WriteString("  env:\n")
	for k, v := range env {
		fmt.Fprintf(&b, "  - {name: %q, value: %q}\n", k, v)
	}
	f := &execFixture{logs: &syncBuffer{}, metrics: metrics.New("test")}
	var err error
	f.c, err = New(Options{
		ConfigFile: writeFile(t, t.TempDir(), "config.yaml", b.String(), 0o644),
		BinDir:     dir,
		Timeout:    timeout,
		Logger:     slog.New(slog.NewJSONHandler(f.logs, nil)),
		Metrics:    f.metrics,
	})
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func (f *execFixture) credRuns(t *testing.T, result string) float64 {
	return (&fixture{metrics: f.metrics}).credRuns(t, "p", result)
}

func TestExecPlugin(t *testing.T) {
	bin := buildPlugin(t)
	dir := t.TempDir()
	pwFile := writeFile(t, dir, "password", "one\n", 0o600)
	countFile := filepath.Join(dir, "count")
	f := newExec(t, bin, 5*time.Second,
		[]string{"--username", "robot", "--password-file", pwFile, "--count-file", countFile},
		map[string]string{"CREDPLUGIN_CACHE_DURATION": "0s", "CREDPLUGIN_CACHE_KEY_TYPE": "Image"})
	cred, err := f.c.Lookup(context.Background(), "127.0.0.1:5000", "team/app")
	if err != nil || cred != (upstream.Credential{Username: "robot", Password: "one"}) {
		t.Fatalf("Lookup: %+v, %v", cred, err)
	}
	// cacheDuration 0s: the next Lookup runs the plugin, which reads the
	// rotated password.
	writeFile(t, dir, "password", "two\n", 0o600)
	cred, err = f.c.Lookup(context.Background(), "127.0.0.1:5000", "team/app")
	if err != nil || cred.Password != "two" {
		t.Fatalf("after rotation: %+v, %v", cred, err)
	}
	b, err := os.ReadFile(countFile)
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(string(b), "\n"); n != 2 {
		t.Errorf("%d runs, want 2", n)
	}
	if got := f.credRuns(t, "ok"); got != 2 {
		t.Errorf("ok runs counted %v", got)
	}
	if strings.Contains(f.logs.String(), "one") || strings.Contains(f.logs.String(), "two") {
		t.Errorf("log carries a password:\n%s", f.logs)
	}
}

func TestExecPluginFails(t *testing.T) {
	bin := buildPlugin(t)
	f := newExec(t, bin, 5*time.Second, []string{"--fail", "--password", "hunter2"}, nil)
	_, err := f.c.Lookup(context.Background(), "127.0.0.1:5000", "team/app")
	if !errors.Is(err, upstream.ErrNoCredentials) || err == upstream.ErrNoCredentials {
		t.Fatalf("failing plugin: %v", err)
	}
	if !strings.Contains(err.Error(), "exit status 1") {
		t.Errorf("error %q lacks the exit status", err)
	}
	if !strings.Contains(f.logs.String(), "failing as told") {
		t.Errorf("stderr not logged:\n%s", f.logs)
	}
	if got := f.credRuns(t, "failed"); got != 1 {
		t.Errorf("failed runs counted %v", got)
	}
}

// waitGone waits until pid is gone (or a zombie: its parent was killed,
// the reaper may be slow), failing the test after 2s.
func waitGone(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for {
		if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
			return
		}
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil {
			if i := bytes.LastIndexByte(b, ')'); i > 0 && i+2 < len(b) && b[i+2] == 'Z' {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("process %d still runs", pid)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// readPIDs reads the process ids a plugin wrote to file.
func readPIDs(t *testing.T, file string) []int {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var pids []int
	for _, f := range strings.Fields(string(b)) {
		pid, err := strconv.Atoi(f)
		if err != nil {
			t.Fatal(err)
		}
		pids = append(pids, pid)
	}
	if len(pids) == 0 {
		t.Fatal("no pid written")
	}
	return pids
}

func TestExecPluginHangs(t *testing.T) {
	bin := buildPlugin(t)
	pidFile := filepath.Join(t.TempDir(), "pid")
	const timeout = 300 * time.Millisecond
	f := newExec(t, bin, timeout, []string{"--hang", "--pid-file", pidFile}, nil)
	start := time.Now()
	_, err := f.c.Lookup(context.Background(), "127.0.0.1:5000", "team/app")
	took := time.Since(start)
	if !errors.Is(err, upstream.ErrNoCredentials) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("hanging plugin: %v", err)
	}
	if took > timeout+time.Second {
		t.Errorf("Lookup took %v with a timeout of %v", took, timeout)
	}
	for _, pid := range readPIDs(t, pidFile) {
		waitGone(t, pid)
	}
	if got := f.credRuns(t, "timeout"); got != 1 {
		t.Errorf("timeouts counted %v", got)
	}
}

// shellPlugin writes a /bin/sh plugin script.
func shellPlugin(t *testing.T, script string) string {
	t.Helper()
	if _, err := os.Stat("/bin/sh"); err != nil {
		t.Skip("no /bin/sh")
	}
	return writeFile(t, t.TempDir(), "plugin.sh", "#!/bin/sh\n"+script, 0o755)
}

func TestExecPluginChildrenKilled(t *testing.T) {
	// A plugin that forks a child holding stdout, then hangs.
	bin := shellPlugin(t, `sleep 300 &
echo "$$ $!" > "$PIDFILE"
wait
`)
	pidFile := filepath.Join(t.TempDir(), "pids")
	const timeout = 300 * time.Millisecond
	f := newExec(t, bin, timeout, nil, map[string]string{"PIDFILE": pidFile})
	start := time.Now()
	_, err := f.c.Lookup(context.Background(), "127.0.0.1:5000", "team/app")
	took := time.Since(start)
	if !errors.Is(err, upstream.ErrNoCredentials) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("hanging plugin: %v", err)
	}
	if took > timeout+time.Second {
		t.Errorf("Lookup took %v with a timeout of %v", took, timeout)
	}
	pids := readPIDs(t, pidFile)
	if len(pids) != 2 {
		t.Fatalf("pids %v", pids)
	}
	for _, pid := range pids {
		waitGone(t, pid)
	}
}

func TestExecPluginLeavesChild(t *testing.T) {
	// A plugin that answers and exits, leaving a child holding stdout: the
	// answer counts, the run does not wait for the child, which is killed.
	bin := shellPlugin(t, `(sleep 300; echo) &
echo "$!" > "$PIDFILE"
echo '{"apiVersion":"`+v1+`","kind":"CredentialProviderResponse","cacheKeyType":"Registry","auth":{"127.0.0.1:5000":{"username":"u","password":"p"}}}'
`)
	pidFile := filepath.Join(t.TempDir(), "pids")
	f := newExec(t, bin, 5*time.Second, nil, map[string]string{"PIDFILE": pidFile})
	start := time.Now()
	cred, err := f.c.Lookup(context.Background(), "127.0.0.1:5000", "team/app")
	if err != nil || cred != (upstream.Credential{Username: "u", Password: "p"}) {
		t.Fatalf("Lookup: %+v, %v", cred, err)
	}
	if took := time.Since(start); took > waitDelay+time.Second {
		t.Errorf("Lookup took %v", took)
	}
	for _, pid := range readPIDs(t, pidFile) {
		waitGone(t, pid)
	}
}

func TestExecPluginOversized(t *testing.T) {
	bin := shellPlugin(t, fmt.Sprintf("head -c %d /dev/zero\n", 2*MaxResponseSize))
	f := newExec(t, bin, 5*time.Second, nil, nil)
	_, err := f.c.Lookup(context.Background(), "127.0.0.1:5000", "team/app")
	if !errors.Is(err, upstream.ErrNoCredentials) || !strings.Contains(err.Error(), "exceeds") {
		t.Fatalf("oversized answer: %v", err)
	}
}

func TestExecRunnerMissingBinary(t *testing.T) {
	_, err := ExecRunner{}.Run(context.Background(), filepath.Join(t.TempDir(), "gone"), nil, nil, nil)
	if err == nil {
		t.Fatal("no error")
	}
}
