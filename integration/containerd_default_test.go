package integration

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// defaultHostsDir is the directory containerd 2.2 and later default
// config_path to (with /etc/docker/certs.d): a test of that default must
// write there, on the machine. Each run writes only its own registry's
// directory, named after a port it holds, and removes it.
const defaultHostsDir = "/etc/containerd/certs.d"

// TestContainerdDefaultConfigPath checks containerd-config's decision
// against what containerd 2.x does with the same config.toml: with
// config_path unset (its default configuration) and with the advice
// applied. A pull through CRI either goes through the mirror or straight
// to the registry, whose port counts the connections it gets.
func TestContainerdDefaultConfigPath(t *testing.T) {
	needRoot(t)
	v := containerds[1]
	daemon, ctr, crictl := v.daemon(t), v.ctr(t), tool(t, "crictl")

	// The image's registry as its references name it: a loopback port
	// that counts connections and closes them, so a pull that does not
	// go through the mirror fails without leaving the machine.
	direct, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { direct.Close() })
	var directConns atomic.Int64
	go func() {
		for {
			c, err := direct.Accept()
			if err != nil {
				return
			}
			directConns.Add(1)
			c.Close()
		}
	}()
	registry := direct.Addr().String()

	reg := startRegistry(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := reg.PushImage(ctx, "library/small", "v1", []int64{64 << 10, 128 << 10}, 11); err != nil {
		t.Fatal(err)
	}

	// Only this registry's directory is ours; certs.d and /etc/containerd
	// go too if this test created them.
	for _, d := range []string{filepath.Dir(defaultHostsDir), defaultHostsDir} {
		if _, err := os.Stat(d); errors.Is(err, os.ErrNotExist) {
			t.Cleanup(func() { os.Remove(d) })
		}
	}
	t.Cleanup(func() { os.RemoveAll(filepath.Join(defaultHostsDir, registry)) })

	const base = `version = 3
root = "%[1]s/root"
state = "%[1]s/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.erofs", "io.containerd.nri.v1.nri"]
[grpc]
  address = "%[1]s/c.sock"
[ttrpc]
  address = "%[1]s/c.sock.ttrpc"
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "native"
%[3]s
[plugins."io.containerd.transfer.v1.local"]
  [[plugins."io.containerd.transfer.v1.local".unpack_config]]
    platform = "linux/%[2]s"
    snapshotter = "native"
`
	tests := []struct {
		name string
		// extra goes in the cri.v1.images section.
		extra string
		// decided is in containerd-config's output.
		decided     string
		throughPull bool
	}{
		// containerd's default: config_path unset.
		{"default", "", "decided: containerd does not read " + defaultHostsDir, false},
		// The advice applied.
		{"config_path set", `  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "` + defaultHostsDir + `"`, `sets config_path = "` + defaultHostsDir + `": containerd reads these files`, true},
		// The default with pulls through the local client: 2.2 and
		// later read the default list.
		{"default, local client", "  use_local_image_pull = true", "containerd 2.2 and later reads them: config_path defaults to", true},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// A mirror of its own: an empty cache, so what a pull
			// through it takes shows at the upstream registry.
			px := startProxy(t, "", "--upstream", registry+"="+reg.URL)
			d := shortTemp(t, "rp-ctdd-")
			cfg := filepath.Join(d, "config.toml")
			if err := os.WriteFile(cfg, []byte(fmt.Sprintf(base, d, runtime.GOARCH, tt.extra)), 0o644); err != nil {
				t.Fatal(err)
			}
			out := mustRun(t, time.Minute, *proxyBin, "containerd-config", "--containerd-config", cfg,
				"--config-path", defaultHostsDir, "--registry", registry, "--mirror", "http://"+px.Addr)
			if !strings.Contains(out, tt.decided) {
				t.Fatalf("containerd-config decided otherwise; want %q:\n%s", tt.decided, out)
			}
			c := &containerdEnv{dir: d, sock: d + "/c.sock", ctr: ctr, daemon: daemon,
				args: []string{"--config", cfg, "--log-level", "debug"}, env: v.env(t)}
			c.start(t)

			ep := "unix://" + c.sock
			ref := fmt.Sprintf("%s/library/small:v1", registry)
			before, blobsBefore := directConns.Load(), reg.BlobBytes()
			pullOut, err := run(t, 2*time.Minute, crictl, "--runtime-endpoint", ep, "--image-endpoint", ep, "--timeout", "90s", "pull", ref)
			direct, blobs := directConns.Load()-before, reg.BlobBytes()-blobsBefore
			mode := "transfer service"
			if strings.Contains(c.proc.output(), "using client.Pull()") {
				mode = "local client"
			}
			t.Logf("case %d: pull err %v, %d connections to the registry itself, %d blob bytes through the mirror (%s)", i, err, direct, blobs, mode)
			if tt.throughPull {
				if err != nil || direct != 0 || blobs == 0 {
					t.Fatalf("containerd-config says containerd reads the hosts files, but the pull did not go through the mirror: %v\n%s\n%s",
						err, pullOut, tail(c.proc.output(), 20))
				}
				return
			}
			if err == nil || direct == 0 || blobs != 0 {
				t.Fatalf("containerd-config says containerd does not read the hosts files, but the pull went through the mirror (err %v, %d direct connections)\n%s",
					err, direct, pullOut)
			}
		})
	}
}
