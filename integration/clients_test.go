package integration

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/registry-proxy/registry-proxy/internal/testregistry"
)

// The image every client pulls: several layers, one of 256 MiB.
var layerFiles = []int64{64 << 10, 3 << 20, 256 << 20}

const (
	imageRepo = "library/app"
	imageTag  = "v1"
	// mirroredRegistry is the registry name in image references: nothing
	// resolves it, so only the mirror can serve it.
	mirroredRegistry = "registry.test.invalid"
)

var (
	imageOnce sync.Once
	imageReg  *testregistry.Registry
	image     *testregistry.Image
	imageErr  error
)

// sharedImage starts one upstream registry holding the test image for all
// client tests (generating 256 MiB of layers once).
func sharedImage(t *testing.T) (*testregistry.Registry, *testregistry.Image) {
	t.Helper()
	imageOnce.Do(func() {
		imageReg, imageErr = testregistry.Start(testregistry.Options{})
		if imageErr != nil {
			return
		}
		image, imageErr = imageReg.PushImage(context.Background(), imageRepo, imageTag, layerFiles, 7)
	})
	if imageErr != nil {
		t.Fatal(imageErr)
	}
	return imageReg, image
}

func imageBytes(img *testregistry.Image) int64 {
	var n int64
	for _, l := range img.Layers {
		n += l.Size
	}
	return n
}

type containerdVersion struct {
	name   string
	daemon func(t testing.TB) string
	ctr    func(t testing.TB) string
	// config is the daemon's config.toml, its state under dir, images
	// unpacked by the snapshotter named.
	config func(dir, snapshotter string) string
	// env is the daemon's environment beyond the test's.
	env func(t testing.TB) []string
}

var containerds = []containerdVersion{
	{
		name:   "containerd-1.x",
		daemon: func(t testing.TB) string { return tool(t, "containerd", "/usr/bin") },
		ctr:    func(t testing.TB) string { return tool(t, "ctr", "/usr/bin") },
		config: func(d, snap string) string {
			return fmt.Sprintf(`version = 2
root = "%[1]s/root"
state = "%[1]s/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "%[1]s/c.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "%[1]s/opt"
[plugins."io.containerd.grpc.v1.cri"]
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "%[2]s"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "%[1]s/certs.d"
`, d, snap)
		},
	},
	{
		name:   "containerd-2.x",
		daemon: func(t testing.TB) string { return tool(t, "containerd2") },
		ctr:    func(t testing.TB) string { return tool(t, "ctr2") },
		// Its own runc shim first on PATH, before Debian's 1.x one.
		env: func(t testing.TB) []string {
			shim := tool(t, "containerd-shim-runc-v2", filepath.Join(filepath.Dir(tool(t, "containerd2")), "..", "containerd2-shim"))
			return []string{"PATH=" + filepath.Dir(shim) + ":" + os.Getenv("PATH")}
		},
		config: func(d, snap string) string {
			return fmt.Sprintf(`version = 3
root = "%[1]s/root"
state = "%[1]s/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.erofs"]
[grpc]
  address = "%[1]s/c.sock"
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "%[3]s"
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "%[1]s/certs.d"
[plugins."io.containerd.transfer.v1.local"]
  [[plugins."io.containerd.transfer.v1.local".unpack_config]]
    platform = "linux/%[2]s"
    snapshotter = "%[3]s"
`, d, runtime.GOARCH, snap)
		},
	},
}

// containerdEnv is a containerd daemon of the test's own.
type containerdEnv struct {
	dir, sock, hosts, ctr string
	daemon                string
	args, env             []string
	proc                  *proc
}

func startContainerd(t testing.TB, v containerdVersion, mirror string) *containerdEnv {
	t.Helper()
	return startContainerdWith(t, v, mirror, nil)
}

// startContainerdWith is startContainerd with edit applied to the daemon's
// config.toml first (nil: as is).
func startContainerdWith(t testing.TB, v containerdVersion, mirror string, edit func(config string) string) *containerdEnv {
	t.Helper()
	needRoot(t)
	daemon, ctr := v.daemon(t), v.ctr(t)
	d := shortTemp(t, "rp-ctd-")
	env := &containerdEnv{dir: d, sock: d + "/c.sock", hosts: d + "/certs.d", ctr: ctr, daemon: daemon}
	cfg := filepath.Join(d, "config.toml")
	// native: checkUnpacked reads the layers' files from its snapshot
	// directories.
	config := v.config(d, "native")
	if edit != nil {
		config = edit(config)
	}
	if err := os.WriteFile(cfg, []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	// The hosts files as an operator writes them: registry-proxy
	// containerd-config, which also checks containerd's config_path. The
	// registry's own server does not resolve, so a pull succeeds only
	// through the mirror.
	out := mustRun(t, time.Minute, *proxyBin, "containerd-config", "--containerd-config", cfg, "--config-path", env.hosts,
		"--registry", mirroredRegistry, "--mirror", "http://"+mirror)
	if !strings.Contains(out, "sets config_path = \""+env.hosts+"\"") {
		t.Fatalf("containerd-config did not find %s's config_path: %s", v.name, out)
	}
	if v.env != nil {
		env.env = v.env(t)
	}
	env.args = []string{"--config", cfg, "--log-level", "info"}
	env.start(t)
	return env
}

// start runs the daemon and waits until it answers.
func (c *containerdEnv) start(t testing.TB) {
	t.Helper()
	c.proc = start(t, c.daemon, c.args, c.env...)
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := run(t, 5*time.Second, c.ctr, "--address", c.sock, "version"); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("containerd did not come up")
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// kill stops the daemon at once (SIGKILL), as a crash would.
func (c *containerdEnv) kill() {
	syscall.Kill(-c.proc.cmd.Process.Pid, syscall.SIGKILL)
	<-c.proc.done
}

func (c *containerdEnv) ctrCmd(t testing.TB, args ...string) string {
	t.Helper()
	return mustRun(t, 5*time.Minute, c.ctr, append([]string{"--address", c.sock, "--namespace", "rptest"}, args...)...)
}

// checkUnpacked finds every layer's file, at its size, in the native
// snapshotter's directories.
func checkUnpacked(t *testing.T, root string) {
	t.Helper()
	want := map[string]int64{}
	for i, n := range layerFiles {
		want[fmt.Sprintf("data-%d", 7*1000+i)] = n
	}
	filepath.Walk(root, func(p string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() {
			if n, ok := want[fi.Name()]; ok && n == fi.Size() {
				delete(want, fi.Name())
			}
		}
		return nil
	})
	if len(want) > 0 {
		t.Fatalf("layers not unpacked: %v missing under %s", want, root)
	}
}

func TestContainerdPullThroughMirror(t *testing.T) {
	reg, img := sharedImage(t)
	for _, v := range containerds {
		t.Run(v.name, func(t *testing.T) {
			px := startProxy(t, "", "--upstream", mirroredRegistry+"="+reg.URL)
			c := startContainerd(t, v, px.Addr)
			ref := mirroredRegistry + "/" + imageRepo + ":" + imageTag
			before := reg.BlobBytes()

			c.ctrCmd(t, "images", "pull", "--hosts-dir", c.hosts, "--snapshotter", "native", ref)
			checkUnpacked(t, c.dir+"/root")
			cold := reg.BlobBytes() - before
			// The blobs (layers and config) came through the mirror once.
			if cold < imageBytes(img) || cold > imageBytes(img)+1<<20 {
				t.Errorf("cold pull took %d bytes from upstream, want about %d", cold, imageBytes(img))
			}

			// Warm: remove the image and its content, pull again.
			c.ctrCmd(t, "images", "rm", "--sync", ref)
			c.ctrCmd(t, "content", "prune", "references")
			before = reg.BlobBytes()
			c.ctrCmd(t, "images", "pull", "--hosts-dir", c.hosts, "--snapshotter", "native", ref)
			if warm := reg.BlobBytes() - before; warm != 0 {
				t.Errorf("warm pull took %d blob bytes from upstream, want 0", warm)
			}
			if !strings.Contains(c.ctrCmd(t, "images", "ls"), ref) {
				t.Errorf("image %s not listed", ref)
			}
		})
	}
}

func TestCrictlPullThroughMirror(t *testing.T) {
	reg, _ := sharedImage(t)
	crictl := tool(t, "crictl")
	for _, v := range containerds {
		t.Run(v.name, func(t *testing.T) {
			px := startProxy(t, "", "--upstream", mirroredRegistry+"="+reg.URL)
			c := startContainerd(t, v, px.Addr)
			ref := mirroredRegistry + "/" + imageRepo + ":" + imageTag
			ep := "unix://" + c.sock
			out := mustRun(t, 5*time.Minute, crictl, "--runtime-endpoint", ep, "--image-endpoint", ep, "--timeout", "4m", "pull", ref)
			if !strings.Contains(out, "Image is up to date") {
				t.Fatalf("crictl pull: %s", out)
			}
			out = mustRun(t, time.Minute, crictl, "--runtime-endpoint", ep, "--image-endpoint", ep, "images")
			if !strings.Contains(out, mirroredRegistry+"/"+imageRepo) {
				t.Fatalf("crictl images: %s", out)
			}
			checkUnpacked(t, c.dir+"/root")
		})
	}
}

func TestDockerdPullThroughMirror(t *testing.T) {
	needRoot(t)
	reg, img := sharedImage(t)
	dockerd := tool(t, "dockerd", "/usr/sbin", "/usr/bin")
	docker := tool(t, "docker", "/usr/bin")
	// dockerd sends no ns=: the default registry, docker.io, maps to the test
	// upstream. Docker Hub itself is unreachable, so success means the mirror.
	px := startProxy(t, "", "--upstream", "docker.io="+reg.URL, "--default-registry", "docker.io")
	d := shortTemp(t, "rp-dkd-")
	cfg := filepath.Join(d, "daemon.json")
	// An existing daemon.json with keys of its own: docker-config adds the
	// mirror and keeps them (dockerd refuses to start on a key it does not know).
	os.WriteFile(cfg, []byte(`{"log-level": "warn", "max-concurrent-downloads": 4}`), 0o644)
	out := mustRun(t, time.Minute, *proxyBin, "docker-config", "--daemon-json", cfg, "--mirror", "http://"+px.Addr)
	if !strings.Contains(out, "added http://"+px.Addr) {
		t.Fatalf("docker-config: %s", out)
	}
	if b, _ := os.ReadFile(cfg); !strings.Contains(string(b), `"max-concurrent-downloads": 4`) || !strings.Contains(string(b), px.Addr) {
		t.Fatalf("daemon.json after docker-config: %s", b)
	}
	host := "unix://" + d + "/docker.sock"
	start(t, dockerd, []string{
		"--config-file", cfg, "--data-root", d + "/data", "--exec-root", d + "/exec", "--pidfile", d + "/docker.pid",
		"--host", host, "--iptables=false", "--ip6tables=false", "--bridge=none", "--storage-driver", "vfs",
	})
	deadline := time.Now().Add(60 * time.Second)
	for {
		if _, err := run(t, 5*time.Second, docker, "--host", host, "version"); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("dockerd did not come up")
		}
		time.Sleep(300 * time.Millisecond)
	}
	before := reg.BlobBytes()
	out = mustRun(t, 5*time.Minute, docker, "--host", host, "pull", "app:"+imageTag)
	if !strings.Contains(out, img.Digest) {
		t.Errorf("docker pull output lacks the manifest digest %s:\n%s", img.Digest, out)
	}
	if got := reg.BlobBytes() - before; got < imageBytes(img) {
		t.Errorf("upstream sent %d blob bytes, want at least %d", got, imageBytes(img))
	}
	out = mustRun(t, time.Minute, docker, "--host", host, "image", "inspect", "--format", "{{len .RootFS.Layers}}", "app:"+imageTag)
	if strings.TrimSpace(out) != fmt.Sprint(len(layerFiles)) {
		t.Errorf("image has %s layers, want %d", out, len(layerFiles))
	}
}
