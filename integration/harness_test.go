// Package integration runs the built registry-proxy binary against a real
// registry server and real clients: containerd (Debian's 1.x and a 2.x
// build), ctr, crictl through CRI, and dockerd, each started here with its
// own root, state and socket under a temporary directory.
package integration

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/registry-proxy/registry-proxy/internal/testregistry"
)

var (
	proxyBin = flag.String("proxy-bin", "", "registry-proxy binary (built from ./cmd/registry-proxy when empty)")
	regBin   = flag.String("registry-bin", "", "testregistry binary (built from ./cmd/testregistry when empty)")
	// faultyBin is registry-proxy built with -tags faults: it lies to its
	// peers as REGISTRY_PROXY_FAULTS says.
	faultyBin = flag.String("faulty-bin", "", "registry-proxy built with -tags faults (built when empty)")
	toolsDir  = flag.String("tools-dir", "", "directory holding containerd 2.x and crictl (default: ../.tools/bin, then PATH)")
)

// interrupted holds what must be undone if the run is interrupted (Ctrl-C,
// SIGTERM): network namespaces and the processes in them outlive the test
// binary otherwise. Tests also undo them themselves on the way out.
var interrupted = struct {
	sync.Mutex
	next int
	fns  map[int]func()
}{fns: map[int]func(){}}

// onInterrupt registers f to run on SIGINT/SIGTERM; the returned func
// unregisters it.
func onInterrupt(f func()) (unregister func()) {
	interrupted.Lock()
	defer interrupted.Unlock()
	k := interrupted.next
	interrupted.next++
	interrupted.fns[k] = f
	return func() {
		interrupted.Lock()
		defer interrupted.Unlock()
		delete(interrupted.fns, k)
	}
}

func handleInterrupts() {
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		sig := <-ch
		fmt.Fprintf(os.Stderr, "integration: %v: cleaning up\n", sig)
		interrupted.Lock()
		// Newest first: processes before the lab they run in.
		keys := make([]int, 0, len(interrupted.fns))
		for k := range interrupted.fns {
			keys = append(keys, k)
		}
		sort.Sort(sort.Reverse(sort.IntSlice(keys)))
		for _, k := range keys {
			interrupted.fns[k]()
		}
		interrupted.Unlock()
		os.Exit(130)
	}()
}

func TestMain(m *testing.M) {
	flag.Parse()
	handleInterrupts()
	code := func() int {
		dir, err := os.MkdirTemp("", "rp-bin-")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		for _, b := range []struct {
			path      *string
			pkg, tags string
		}{{proxyBin, "registry-proxy", ""}, {regBin, "testregistry", ""}, {faultyBin, "registry-proxy", "faults"}} {
			if *b.path != "" {
				continue
			}
			*b.path = filepath.Join(dir, b.pkg+"-"+b.tags)
			cmd := exec.Command("go", "build", "-tags", b.tags, "-o", *b.path, "../cmd/"+b.pkg)
			cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
			if err := cmd.Run(); err != nil {
				fmt.Fprintln(os.Stderr, "building", b.pkg+":", err)
				return 1
			}
		}
		return m.Run()
	}()
	os.Exit(code)
}

// inCI is true where every test must run: a missing tool or root is a failure.
func inCI() bool { return os.Getenv("CI") == "true" }

// need skips (outside CI) or fails (in CI) when a requirement is missing.
func need(t testing.TB, ok bool, why string) {
	t.Helper()
	if ok {
		return
	}
	if inCI() {
		t.Fatalf("requirement missing under CI=true: %s", why)
	}
	t.Skipf("skipped: %s (runs under CI=true; `make test` installs it)", why)
}

func needRoot(t testing.TB) { need(t, os.Geteuid() == 0, "needs root") }

// tool finds an executable: the tools dir first, then PATH.
func tool(t testing.TB, name string, paths ...string) string {
	t.Helper()
	dirs := append([]string{}, paths...)
	if *toolsDir != "" {
		dirs = append(dirs, *toolsDir)
	}
	dirs = append(dirs, "../.tools/bin")
	for _, d := range dirs {
		p := filepath.Join(d, name)
		if fi, err := os.Stat(p); err == nil && !fi.IsDir() {
			abs, _ := filepath.Abs(p)
			return abs
		}
	}
	p, err := exec.LookPath(name)
	need(t, err == nil, name+" not found")
	return p
}

// shortTemp returns a fresh directory with a short path: unix sockets must
// fit in 108 bytes.
func shortTemp(t testing.TB, prefix string) string {
	t.Helper()
	d, err := os.MkdirTemp("/tmp", prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Snapshots and daemon state may hold read-only dirs.
		exec.Command("chmod", "-R", "u+w", d).Run()
		os.RemoveAll(d)
	})
	return d
}

// proc is a daemon started by a test, stopped at cleanup.
type proc struct {
	cmd  *exec.Cmd
	mu   sync.Mutex
	out  bytes.Buffer
	done chan struct{}
}

func (p *proc) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.out.Write(b)
}

func (p *proc) output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.out.String()
}

// start runs a daemon; at cleanup it gets SIGTERM, then SIGKILL, and its
// output goes to the test log if the test failed.
func start(t testing.TB, name string, args []string, env ...string) *proc {
	t.Helper()
	p := &proc{done: make(chan struct{})}
	p.cmd = exec.Command(name, args...)
	p.cmd.Env = append(os.Environ(), env...)
	p.cmd.Stdout, p.cmd.Stderr = p, p
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() {
		p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.stop()
		if t.Failed() {
			t.Logf("--- output of %s %s:\n%s", filepath.Base(name), strings.Join(args, " "), tail(p.output(), 8000))
		}
	})
	return p
}

func (p *proc) stop() {
	select {
	case <-p.done:
		return
	default:
	}
	syscall.Kill(-p.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(15 * time.Second):
		syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.done
	}
}

func tail(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}

// run runs a command to completion with a timeout and returns its output.
func run(t testing.TB, timeout time.Duration, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	return string(out), err
}

func mustRun(t testing.TB, timeout time.Duration, name string, args ...string) string {
	t.Helper()
	out, err := run(t, timeout, name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, tail(out, 4000))
	}
	return out
}

// proxy is a running registry-proxy binary.
type proxy struct {
	*proc
	Addr    string
	Admin   string // the admin listener: /debug/*
	DataDir string
}

// startProxy runs the binary with --listen 127.0.0.1:0 (and the admin
// listener on another free port) and waits for the addresses it logs.
func startProxy(t testing.TB, dataDir string, args ...string) *proxy {
	t.Helper()
	return startProxyBin(t, *proxyBin, dataDir, args...)
}

// startProxyBin is startProxy with another build of the binary.
func startProxyBin(t testing.TB, bin, dataDir string, args ...string) *proxy {
	t.Helper()
	px, err := tryStartProxyBin(t, bin, dataDir, args...)
	if err != nil {
		t.Fatal(err)
	}
	return px
}

// errPortTaken is a proxy that exited because an address it was given was
// taken in the meantime (a port reserved free, then used by another
// process's connection): the caller may start it again on other ports.
var errPortTaken = errors.New("address already in use")

// tryStartProxyBin is startProxyBin returning why the proxy did not start.
func tryStartProxyBin(t testing.TB, bin, dataDir string, args ...string) (*proxy, error) {
	t.Helper()
	if dataDir == "" {
		dataDir = t.TempDir()
	}
	all := []string{"serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--data-dir", dataDir, "--log-format", "json", "--log-level", "debug"}
	if !slices.Contains(args, "--containerd-address") {
		// Not the machine's containerd, should it run one.
		all = append(all, "--containerd-address", "none")
	}
	all = append(all, args...)
	p := &proc{done: make(chan struct{})}
	p.cmd = exec.Command(bin, all...)
	pr, pw := io.Pipe()
	p.cmd.Stdout, p.cmd.Stderr = pw, pw
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.cmd.Wait()
		pw.Close()
		close(p.done)
	}()
	addr := make(chan [2]string, 1)
	go func() {
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			line := sc.Bytes()
			p.Write(append(line, '\n'))
			var rec struct{ Msg, Listen, Admin string }
			if json.Unmarshal(line, &rec) == nil && rec.Msg == "registry-proxy serving" {
				addr <- [2]string{rec.Listen, rec.Admin}
			}
		}
	}()
	px := &proxy{proc: p, DataDir: dataDir}
	t.Cleanup(func() {
		px.stopProxy()
		if t.Failed() {
			t.Logf("--- registry-proxy log:\n%s", tail(p.output(), 12000))
		}
	})
	select {
	case a := <-addr:
		px.Addr, px.Admin = a[0], a[1]
	case <-p.done:
		if out := p.output(); strings.Contains(out, "address already in use") {
			return nil, fmt.Errorf("registry-proxy exited: %w: %s", errPortTaken, out)
		}
		return nil, fmt.Errorf("registry-proxy exited: %s", p.output())
	case <-time.After(30 * time.Second):
		return nil, fmt.Errorf("registry-proxy did not start: %s", p.output())
	}
	return px, nil
}

func (p *proxy) stopProxy() {
	select {
	case <-p.done:
		return
	default:
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(30 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
	}
}

// startRegistry starts the upstream registry for a test.
func startRegistry(t testing.TB) *testregistry.Registry {
	t.Helper()
	reg, err := testregistry.Start(testregistry.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close() })
	return reg
}

// writeHostsDir writes a containerd hosts directory for registry whose
// server nothing listens on and whose only host is the mirror, so a pull can
// only succeed through it.
func writeHostsDir(t testing.TB, dir, registry, mirror string) {
	t.Helper()
	d := filepath.Join(dir, registry)
	if err := os.MkdirAll(d, 0o755); err != nil {
		t.Fatal(err)
	}
	hosts := fmt.Sprintf("server = \"https://127.0.0.1:9\"\n\n[host.\"http://%s\"]\n  capabilities = [\"pull\", \"resolve\"]\n", mirror)
	if err := os.WriteFile(filepath.Join(d, "hosts.toml"), []byte(hosts), 0o644); err != nil {
		t.Fatal(err)
	}
}
