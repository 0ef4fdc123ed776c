package integration

import (
	"context"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// `containerd-config --uninstall` leaves containerd as it was: a node had
// its own hosts.toml for the registry (straight to the registry, with a
// header of its own); containerd-config put the mirror first and kept that
// file; containerd (2.x, at debug level, which logs every host it tries)
// pulled through the mirror. After --uninstall, with the mirror stopped,
// the node's file is back byte for byte with its mode, every file
// containerd-config wrote is gone, and the next pull goes straight to the
// registry, with the node's header and no attempt at the mirror.
func TestContainerdUninstallRestores(t *testing.T) {
	v := containerds[len(containerds)-1]
	needRoot(t)
	reg := startRegistry(t)
	const repo = "library/uninstall"
	ctx := context.Background()
	first, err := reg.PushImage(ctx, repo, "v1", []int64{64 << 10, 1 << 20}, 21)
	if err != nil {
		t.Fatal(err)
	}
	second, err := reg.PushImage(ctx, repo, "v2", []int64{96 << 10, 2 << 20}, 22)
	if err != nil {
		t.Fatal(err)
	}
	regHost := strings.TrimPrefix(reg.URL, "http://")

	d := shortTemp(t, "rp-uni-")
	c := &containerdEnv{dir: d, sock: d + "/c.sock", hosts: d + "/certs.d", ctr: v.ctr(t), daemon: v.daemon(t)}
	cfg := filepath.Join(d, "config.toml")
	if err := os.WriteFile(cfg, []byte(v.config(d, "native")), 0o644); err != nil {
		t.Fatal(err)
	}
	// The node's own files: one for the registry pulled, one for another.
	nodeHosts := filepath.Join(c.hosts, mirroredRegistry, "hosts.toml")
	original := []byte("# This node's own: straight to the registry, with a header of its own.\n" +
		"server = \"" + reg.URL + "\"\ncapabilities = [\"pull\", \"resolve\"]\n\n[header]\n  x-node-setting = \"kept\"\n")
	other := filepath.Join(c.hosts, "other.test.invalid", "hosts.toml")
	otherBody := []byte("server = \"https://127.0.0.1:9\"\n")
	for p, b := range map[string][]byte{nodeHosts: original, other: otherBody} {
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, b, 0o640); err != nil {
			t.Fatal(err)
		}
		os.Chmod(p, 0o640) // past the umask
	}
	before := hostsTree(t, c.hosts)
	if v.env != nil {
		c.env = v.env(t)
	}
	c.args = []string{"--config", cfg, "--log-level", "debug"}
	c.start(t)

	px := startProxy(t, "", "--upstream", mirroredRegistry+"="+reg.URL)
	install := []string{"containerd-config", "--containerd-config", cfg, "--config-path", c.hosts,
		"--registry", mirroredRegistry, "--registry", "_default", "--mirror", "http://" + px.Addr}
	out := mustRun(t, time.Minute, *proxyBin, install...)
	if !strings.Contains(out, "backed up "+nodeHosts+".registry-proxy-backup") || strings.Count(out, "wrote ") != 2 {
		t.Fatalf("containerd-config: %s", out)
	}
	// Run again (a restarted pod's init container): nothing changes, and
	// the backup is still the node's file, not ours.
	if out := mustRun(t, time.Minute, *proxyBin, install...); strings.Count(out, "unchanged ") != 2 || strings.Contains(out, "backed up") {
		t.Fatalf("containerd-config again: %s", out)
	}
	if b, _ := os.ReadFile(nodeHosts + ".registry-proxy-backup"); string(b) != string(original) {
		t.Fatalf("backup after a second run:\n%s", b)
	}

	ref := func(tag string) string { return mirroredRegistry + "/" + repo + ":" + tag }
	c.ctrCmd(t, "images", "pull", "--hosts-dir", c.hosts, "--snapshotter", "native", ref("v1"))
	if n := scrape(t, px).Sum("registry_proxy_blob_bytes_total", `source="upstream"`); n < float64(first.LayerBytes()) {
		t.Fatalf("the mirror fetched %v blob bytes, want the image's %d: the pull did not go through it", n, first.LayerBytes())
	}
	// The log names the hosts tried: the assertion below can fail.
	if !strings.Contains(c.proc.output(), `host="`+px.Addr+`"`) {
		t.Fatalf("containerd's debug log does not name the mirror %s it pulled through", px.Addr)
	}

	mark := len(c.proc.output())
	out = mustRun(t, time.Minute, *proxyBin, "containerd-config", "--uninstall", "--config-path", c.hosts)
	t.Logf("containerd-config --uninstall:\n%s", out)
	if !strings.Contains(out, "restored "+nodeHosts) || !strings.Contains(out, "removed "+filepath.Join(c.hosts, "_default")+" ") {
		t.Errorf("containerd-config --uninstall: %s", out)
	}
	px.stopProxy()

	if after := hostsTree(t, c.hosts); !slices.Equal(after, before) {
		t.Errorf("config path after --uninstall:\n%s\nwant as before:\n%s", strings.Join(after, "\n"), strings.Join(before, "\n"))
	}
	if b, _ := os.ReadFile(nodeHosts); string(b) != string(original) {
		t.Errorf("the node's hosts.toml after --uninstall:\n%s\nwant:\n%s", b, original)
	}

	up := reg.BlobBytes()
	c.ctrCmd(t, "images", "pull", "--hosts-dir", c.hosts, "--snapshotter", "native", ref("v2"))
	if got := reg.BlobBytes() - up; got < second.LayerBytes() {
		t.Errorf("the registry sent %d blob bytes for the second pull, want at least %d", got, second.LayerBytes())
	}
	log := c.proc.output()[mark:]
	if strings.Contains(log, px.Addr) || strings.Contains(log, "trying next host") {
		t.Errorf("containerd tried the mirror after --uninstall:\n%s", grepLines(log, px.Addr, "trying next host"))
	}
	if !strings.Contains(log, `host="`+regHost+`"`) || !strings.Contains(log, "request.header.x-node-setting=kept") {
		t.Errorf("the pull after --uninstall did not go to %s with the node's header:\n%s", regHost, grepLines(log, "resolving", "do request"))
	}

	if out := mustRun(t, time.Minute, *proxyBin, "containerd-config", "--uninstall", "--config-path", c.hosts); !strings.Contains(out, "nothing recorded") {
		t.Errorf("a second --uninstall: %s", out)
	}
	if after := hostsTree(t, c.hosts); !slices.Equal(after, before) {
		t.Errorf("config path after a second --uninstall:\n%s", strings.Join(after, "\n"))
	}
}

// hostsTree lists every path under root with its mode and, for files,
// content.
func hostsTree(t *testing.T, root string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(root, func(p string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := e.Info()
		if err != nil {
			return err
		}
		line := p + " " + fi.Mode().String()
		if !e.IsDir() {
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			line += " " + string(b)
		}
		out = append(out, line)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// grepLines is the lines of s that hold any of subs.
func grepLines(s string, subs ...string) string {
	var out []string
	for l := range strings.Lines(s) {
		for _, sub := range subs {
			if strings.Contains(l, sub) {
				out = append(out, strings.TrimRight(l, "\n"))
				break
			}
		}
	}
	return tail(strings.Join(out, "\n"), 6000)
}
