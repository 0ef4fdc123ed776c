package integration

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/internal/ports"
	"github.com/registry-proxy/registry-proxy/internal/testregistry"
	"github.com/registry-proxy/registry-proxy/p2p/owner"
)

// What the chart's DaemonSet asks of the binary on a node: peer and admin
// addresses on an IPv6 node (bracketed, as the chart writes $(HOST_IP)),
// containerd through read-only mounts, and a node without containerd where
// the chart looks for it.

// Two nodes on [::1]: each listens on its bracketed peer address, gossips
// on the next port, joins the other by its bracketed address, and one
// takes a blob's pieces from the other over the peer port.
func TestIPv6Peers(t *testing.T) {
	l, err := net.Listen("tcp", "[::1]:0")
	if err != nil {
		t.Skipf("no IPv6 loopback: %v", err)
	}
	l.Close()
	reg := startRegistry(t)
	c := newCluster(t, reg, []string{"node-a", "node-b"})
	for i := range c.peers {
		if c.peers[i], err = ports.FreePair("::1"); err != nil {
			t.Fatal(err)
		}
	}
	for i := range c.ids {
		c.nodes = append(c.nodes, c.startNode(t, i, "--admin-listen", "[::1]:0"))
	}
	for i, p := range c.nodes {
		var rec struct {
			PeerAddr string `json:"peer_addr"`
			Admin    string
		}
		if err := json.Unmarshal([]byte(logLine(p.output(), "registry-proxy serving")), &rec); err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(rec.PeerAddr, "[::1]:") || !strings.HasPrefix(rec.Admin, "[::1]:") {
			t.Fatalf("%s serves peers at %q, admin at %q; want both on [::1]", c.ids[i], rec.PeerAddr, rec.Admin)
		}
	}
	c.waitMembers(t, 2)

	const size = 32 << 20
	d := pushBlob(t, reg, size, 61)
	first := slices.Index(c.ids, owner.Of(d, c.ids))
	second := 1 - first
	for _, i := range []int{first, second} {
		if _, err := fetchVerified(c.url(i, "cluster/blob", d), d); err != nil {
			t.Fatalf("pull through %s: %v", c.ids[i], err)
		}
	}
	if st := stats(t, c.nodes[second], d); peerBytes(st) != size {
		t.Errorf("%s took %d of %d bytes from its peer over [::1] (sources %v)", c.ids[second], peerBytes(st), size, st.Sources)
	}
	if got := reg.BlobBytes(); got > size*11/10 {
		t.Errorf("the upstream sent %d bytes for two pulls of %d", got, size)
	}
}

// mountRO bind-mounts src on dst read-only, as the kubelet mounts a
// readOnly hostPath, and unmounts it at cleanup (and on an interrupt).
func mountRO(t *testing.T, src, dst string) {
	t.Helper()
	mustRun(t, 10*time.Second, "mount", "--bind", src, dst)
	umount := func() { exec.Command("umount", dst).Run() }
	unregister := onInterrupt(umount)
	t.Cleanup(func() {
		if out, err := exec.Command("umount", dst).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v %s", dst, err, out)
			exec.Command("umount", "-l", dst).Run()
		}
		unregister()
	})
	mustRun(t, 10*time.Second, "mount", "-o", "remount,bind,ro", dst)
	// The kernel's word that it is read-only.
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 5 && fields[4] == dst {
			if !slices.Contains(strings.Split(fields[5], ","), "ro") {
				t.Fatalf("%s mounted %s, not read-only", dst, fields[5])
			}
			return
		}
	}
	t.Fatalf("%s not in /proc/self/mountinfo", dst)
}

// containerd's socket reached through a read-only bind mount: its
// directory (what the chart mounts, which also shows the socket containerd
// re-creates when it restarts), and the socket alone (which does not). The
// node lists containerd's content and serves a blob from it to a client,
// through the files of the read-only content directory and through the API.
func TestContainerdReadOnlyMount(t *testing.T) {
	needRoot(t)
	reg := startRegistry(t)
	blob := testregistry.RandomBytes(8<<20, 63)
	d, err := reg.PushBlob(context.Background(), "cluster/blob", blob)
	if err != nil {
		t.Fatal(err)
	}
	ca := startContainerd(t, containerds[len(containerds)-1], "127.0.0.1:9")
	if got := ca.ingestBlob(t, blob); got.String() != d {
		t.Fatalf("ingested %s, pushed %s", got, d)
	}
	parent := t // containerd outlives the subtests, restarted or not
	for _, tc := range []struct {
		name  string
		mount func(t *testing.T) (socket, contentDir string)
		// followsRestart: the mount shows the socket a restarted
		// containerd makes.
		followsRestart bool
	}{
		{"socket's directory", func(t *testing.T) (string, string) {
			mnt := shortTemp(t, "rp-ro-")
			mountRO(t, ca.dir, mnt)
			return filepath.Join(mnt, filepath.Base(ca.sock)), filepath.Join(mnt, "root", "io.containerd.content.v1.content")
		}, true},
		{"socket file", func(t *testing.T) (string, string) {
			dir := shortTemp(t, "rp-ro-")
			sock := filepath.Join(dir, "containerd.sock")
			if err := os.WriteFile(sock, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			mountRO(t, ca.sock, sock)
			content := filepath.Join(dir, "content")
			if err := os.Mkdir(content, 0o755); err != nil {
				t.Fatal(err)
			}
			mountRO(t, ca.contentDir(), content)
			return sock, content
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sock, content := tc.mount(t)
			if err := os.WriteFile(filepath.Join(content, "probe"), nil, 0o600); err == nil || !strings.Contains(err.Error(), "read-only") {
				t.Fatalf("writing into the mounted content directory: %v, want read-only file system", err)
			}
			for _, files := range []bool{true, false} {
				dir := content
				if !files {
					dir = filepath.Join(content, "not-there")
				}
				px := startProxy(t, "", "--upstream", clusterRegistry+"="+reg.URL,
					"--containerd-address", sock, "--containerd-namespace", "rptest", "--containerd-content-dir", dir)
				eventually(t, 30*time.Second, "containerd's blobs listed", func() bool {
					return scrape(t, px).Sum("registry_proxy_containerd_blobs") >= 1
				})
				mode := `"reads":"api"`
				if files {
					mode = `"reads":"files in ` + content
				}
				line := logLine(px.output(), "serving containerd's content store")
				if !strings.Contains(line, mode) || !files && !strings.Contains(line, `"content_dir_err":"stat `+dir) {
					t.Errorf("files=%v: %s; want %s, and why not the files when not", files, line, mode)
				}
				checkServedFromContainerd(t, px, reg, d, int64(len(blob)))
				if tc.followsRestart && !files {
					// containerd removes its socket and makes a new one: the
					// directory mount shows the new one.
					ca.kill()
					ca.start(parent)
					waitOutput(t, px.proc, "containerd reachable again", time.Minute)
					eventually(t, 30*time.Second, "containerd's blobs listed again", func() bool {
						return scrape(t, px).Sum("registry_proxy_containerd_blobs") >= 1
					})
					checkServedFromContainerd(t, px, reg, d, int64(len(blob)))
				}
				px.stopProxy()
			}
			if !tc.followsRestart {
				// Why the chart mounts the directory: a socket mounted alone
				// stays the one containerd removes when it restarts.
				ca.kill()
				ca.start(parent) // waits until containerd answers on its socket
				if c, err := net.Dial("unix", sock); err == nil {
					c.Close()
					t.Error("the socket mounted alone reaches the restarted containerd")
				}
			}
		})
	}
}

// checkServedFromContainerd gets blob d from the node: all of it, from
// containerd's content store, nothing from the upstream.
func checkServedFromContainerd(t *testing.T, px *proxy, reg *testregistry.Registry, d string, size int64) {
	t.Helper()
	before := reg.BlobBytes()
	resp, err := http.Get(fmt.Sprintf("http://%s/v2/cluster/blob/blobs/%s?ns=%s", px.Addr, d, clusterRegistry))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	dg := digest.Canonical.Digester()
	n, err := io.Copy(dg.Hash(), resp.Body)
	if err != nil || resp.StatusCode != 200 || n != size || dg.Digest().String() != d {
		t.Fatalf("GET blob: %s, %d bytes hashing to %s, %v", resp.Status, n, dg.Digest(), err)
	}
	if src := resp.Header.Get("X-Registry-Proxy-Source"); src != "containerd" {
		t.Errorf("served from %q, want containerd", src)
	}
	if up := reg.BlobBytes() - before; up != 0 {
		t.Errorf("%d bytes from the upstream, want 0", up)
	}
}

// A node whose containerd socket and content directory are not where it
// is told (k3s or RKE2 with the default paths, or a directory a runtime
// made for a missing hostPath): it starts, says once why containerd's
// content is not served, keeps trying quietly, and serves pulls.
func TestContainerdMissing(t *testing.T) {
	reg := startRegistry(t)
	for _, tc := range []struct {
		name string
		sock func(dir string) string
		want string
	}{
		{"no socket", func(dir string) string { return filepath.Join(dir, "containerd.sock") }, "no socket at "},
		{"a directory at the socket path", func(dir string) string {
			p := filepath.Join(dir, "containerd.sock")
			os.Mkdir(p, 0o755)
			return p
		}, " is not a socket but a directory"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			sock := tc.sock(dir)
			px := startProxy(t, "", "--upstream", clusterRegistry+"="+reg.URL, "--containerd-address", sock,
				"--containerd-content-dir", filepath.Join(dir, "io.containerd.content.v1.content"))
			// Two quiet retries after the one warning: it keeps trying, and
			// says it once.
			eventually(t, 30*time.Second, "two retries", func() bool {
				return strings.Count(px.output(), "containerd still not reachable") >= 2
			})
			var warned []string
			for _, l := range strings.Split(px.output(), "\n") {
				if strings.Contains(l, "containerd not reachable") {
					warned = append(warned, l)
				}
			}
			if len(warned) != 1 {
				t.Fatalf("%d warnings that containerd is not reachable, want 1: %q", len(warned), warned)
			}
			var rec struct{ Level, Err string }
			if err := json.Unmarshal([]byte(warned[0]), &rec); err != nil {
				t.Fatal(err)
			}
			if rec.Level != "WARN" || !strings.Contains(rec.Err, sock) || !strings.Contains(rec.Err, tc.want) {
				t.Errorf("warning %s; want level WARN and an err naming %s with %q", warned[0], sock, tc.want)
			}
			d := pushBlob(t, reg, 4<<20, 67)
			if _, err := fetchVerified(fmt.Sprintf("http://%s/v2/cluster/blob/blobs/%s?ns=%s", px.Addr, d, clusterRegistry), d); err != nil {
				t.Fatalf("a pull without containerd: %v", err)
			}
		})
	}
}

// Configuration errors exit with status 2 and one line, wherever they are
// found; what fails once the configuration is accepted exits with 1.
func TestExitStatus(t *testing.T) {
	secret := writeSecret(t)
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	dir := t.TempDir()
	base := []string{"serve", "--data-dir", dir, "--containerd-address", "none", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"}
	for _, tc := range []struct {
		name string
		args []string
		code int
		want string
	}{
		{"wildcard peer_listen", []string{"--peer-listen", ":5002", "--cluster-secret", secret}, 2, `config: p2p.peer_listen ":5002" is a wildcard: set p2p.advertise`},
		{"IPv6 peer_listen without brackets", []string{"--peer-listen", "fd00::5:5002", "--cluster-secret", secret}, 2, `p2p.peer_listen "fd00::5:5002": want HOST:PORT, an IPv6 host in brackets`},
		{"IPv6 admin.listen without brackets", []string{"--admin-listen", "::1:5001"}, 2, `admin.listen "::1:5001": want HOST:PORT`},
		{"unknown flag", []string{"--peer-listn", "x"}, 2, "flag provided but not defined"},
		{"check of a valid configuration", []string{"--peer-listen", "[::1]:5002", "--admin-listen", "[127.0.0.1]:5001", "--cluster-secret", secret, "--check-config"}, 0, "configuration valid"},
		{"check of a wildcard", []string{"--peer-listen", "0.0.0.0:5002", "--cluster-secret", secret, "--check-config"}, 2, "is a wildcard"},
		{"listen address taken", []string{"--listen", taken.Addr().String()}, 1, "address already in use"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			cmd := exec.CommandContext(ctx, *proxyBin, append(slices.Clone(base), tc.args...)...)
			out, _ := cmd.CombinedOutput()
			if got := cmd.ProcessState.ExitCode(); got != tc.code || !strings.Contains(string(out), tc.want) {
				t.Errorf("exit status %d, want %d with %q:\n%s", got, tc.code, tc.want, out)
			}
			if tc.code == 2 && strings.Count(strings.TrimSpace(string(out)), "\n") != 0 {
				t.Errorf("more than one line:\n%s", out)
			}
		})
	}
}
