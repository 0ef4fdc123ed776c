package integration

import (
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	imagebuild "github.com/registry-proxy/registry-proxy/internal/image"
)

// The image `make image` writes runs under containerd with `ctr run`, and
// containerd pulls an image through the mirror it serves.
func TestImageRunsInContainerd(t *testing.T) {
	needRoot(t)
	reg, img := sharedImage(t)
	tool(t, "runc", "/usr/sbin", "/usr/bin")
	dir := shortTemp(t, "rp-img-")
	bin := filepath.Join(dir, "registry-proxy")
	// Static, as `make image` builds it: the image has no libc.
	cmd := exec.Command("go", "build", "-trimpath", "-o", bin, "../cmd/registry-proxy")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("static build: %v\n%s", err, out)
	}
	im, err := imagebuild.Build(imagebuild.Options{Binary: bin, Version: "test", OS: "linux", Arch: runtime.GOARCH})
	if err != nil {
		t.Fatal(err)
	}
	const ref = "registry-proxy.test/registry-proxy:test"
	tarPath := filepath.Join(dir, "image.tar")
	if err := imagebuild.WriteTarball(tarPath, im, ref); err != nil {
		t.Fatal(err)
	}
	if err := imagebuild.WriteLayout(filepath.Join(dir, "oci"), im, ref); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "oci", "index.json")); err != nil {
		t.Fatalf("OCI layout: %v", err)
	}
	addr, admin := freeAddr(t), freeAddr(t)
	c := startContainerd(t, containerds[1], addr)
	c.ctrCmd(t, "images", "import", "--snapshotter", "native", tarPath)
	dataDir := filepath.Join(dir, "data")
	os.MkdirAll(dataDir, 0o755)
	logPath := filepath.Join(dir, "container.log")
	id := "rp-" + filepath.Base(dir)
	c.ctrCmd(t, "run", "-d", "--net-host", "--snapshotter", "native", "--log-uri", "file://"+logPath,
		"--mount", "type=bind,src="+dataDir+",dst=/var/lib/registry-proxy,options=rbind:rw",
		ref, id, imagebuild.BinaryPath, "serve", "--listen", addr, "--admin-listen", admin,
		"--upstream", mirroredRegistry+"="+reg.URL)
	t.Cleanup(func() {
		run(t, time.Minute, c.ctr, "--address", c.sock, "--namespace", "rptest", "task", "kill", "-s", "SIGKILL", id)
		time.Sleep(200 * time.Millisecond)
		run(t, time.Minute, c.ctr, "--address", c.sock, "--namespace", "rptest", "task", "delete", "-f", id)
		run(t, time.Minute, c.ctr, "--address", c.sock, "--namespace", "rptest", "container", "delete", id)
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("--- container log:\n%s", tail(string(b), 8000))
		}
	})
	eventually(t, 30*time.Second, "the container's mirror never answered", func() bool {
		resp, err := http.Get("http://" + addr + "/v2/")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})
	before := reg.BlobBytes()
	pulled := mirroredRegistry + "/" + imageRepo + ":" + imageTag
	c.ctrCmd(t, "images", "pull", "--hosts-dir", c.hosts, "--snapshotter", "native", pulled)
	if got := reg.BlobBytes() - before; got < imageBytes(img) {
		t.Errorf("the pull took %d bytes from the upstream through the container, want at least %d", got, imageBytes(img))
	}
	if out := c.ctrCmd(t, "images", "ls"); !strings.Contains(out, pulled) {
		t.Errorf("%s not listed:\n%s", pulled, out)
	}
	// The mirror in the container stored what it served.
	if entries, _ := os.ReadDir(filepath.Join(dataDir, "blobs")); len(entries) == 0 {
		t.Errorf("nothing in the container's data dir %s", dataDir)
	}
}

func freeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}
