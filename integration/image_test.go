package integration

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"debug/elf"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"

	imagebuild "github.com/registry-proxy/registry-proxy/internal/image"
	"github.com/registry-proxy/registry-proxy/internal/testregistry"
)

const (
	// testImageRef names the image the tests build.
	testImageRef = "registry-proxy.test/registry-proxy:test"
	// testImageVersion is the version compiled into its binaries.
	testImageVersion = "image-test"
)

// builtImage is what `make image` writes, built by a test.
type builtImage struct {
	layout, tar string
}

// makeImage builds the image as `make image` does, every default platform,
// into dir: cmd/image cross-compiles the static binaries and writes the
// index.
func makeImage(t *testing.T, dir string) builtImage {
	t.Helper()
	b := builtImage{layout: filepath.Join(dir, "oci"), tar: filepath.Join(dir, "image.tar")}
	start := time.Now()
	mustRun(t, 20*time.Minute, "go", "run", "../cmd/image", "-bin-dir", filepath.Join(dir, "bin"),
		"-layout", b.layout, "-tar", b.tar, "-ref", testImageRef, "-version", testImageVersion,
		"-ldflags", "-s -w -X github.com/registry-proxy/registry-proxy/node.Version="+testImageVersion)
	t.Logf("built the image for %s in %v", strings.Join(imagebuild.DefaultPlatforms(), ", "), time.Since(start).Round(time.Second))
	return b
}

// The image `make image` writes runs under containerd with `ctr run`, and
// containerd pulls an image through the mirror it serves. containerd
// imports the multi-platform tarball for its own platform.
func TestImageRunsInContainerd(t *testing.T) {
	needRoot(t)
	reg, img := sharedImage(t)
	tool(t, "runc", "/usr/sbin", "/usr/bin")
	dir := shortTemp(t, "rp-img-")
	built := makeImage(t, dir)
	const ref = testImageRef
	addr, admin := freeAddr(t), freeAddr(t)
	c := startContainerd(t, containerds[1], addr)
	c.ctrCmd(t, "images", "import", "--snapshotter", "native", built.tar)
	ls := c.ctrCmd(t, "images", "ls")
	for _, p := range imagebuild.DefaultPlatforms() {
		if !strings.Contains(ls, p) {
			t.Errorf("ctr images ls does not list platform %s:\n%s", p, ls)
		}
	}
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

// `make image` writes one index with an image per platform, in the layout
// and in the tarball alike; each platform's binary is that platform's, and
// the arm64 one, run under qemu, mirrors a blob.
func TestImageMultiArch(t *testing.T) {
	dir := shortTemp(t, "rp-imgx-")
	built := makeImage(t, dir)
	var bins map[string]string
	t.Run("layout", func(t *testing.T) {
		bins = checkImageLayout(t, built.layout, filepath.Join(dir, "extracted"))
	})
	// The tarball holds the layout's files, byte for byte: what was checked
	// above.
	t.Run("tarball", func(t *testing.T) {
		compareTarWithDir(t, built.tar, built.layout)
	})
	if t.Failed() {
		return
	}
	// Each binary runs on its platform: natively, or under qemu's user
	// emulation.
	qemu := map[string]string{
		"linux/amd64":  "/usr/bin/qemu-x86_64-static",
		"linux/arm64":  "/usr/bin/qemu-aarch64-static",
		"linux/arm/v7": "/usr/bin/qemu-arm-static",
	}
	runner := func(t *testing.T, p string) []string {
		t.Helper()
		if p == "linux/"+runtime.GOARCH || (runtime.GOARCH == "arm" && strings.HasPrefix(p, "linux/arm/")) {
			return []string{bins[p]}
		}
		_, err := os.Stat(qemu[p])
		need(t, err == nil, "qemu-user-static not installed ("+qemu[p]+" missing) to run the "+p+" binary")
		return []string{qemu[p], bins[p]}
	}
	for _, p := range imagebuild.DefaultPlatforms() {
		t.Run("version "+p, func(t *testing.T) {
			argv := append(runner(t, p), "version")
			out := mustRun(t, time.Minute, argv[0], argv[1:]...)
			if want := "registry-proxy " + testImageVersion; strings.TrimSpace(out) != want {
				t.Errorf("%s version: %q, want %q", p, out, want)
			}
		})
	}
	t.Run("mirror linux/arm64", func(t *testing.T) {
		argv := runner(t, "linux/arm64")
		reg := startRegistry(t)
		blob := testregistry.RandomBytes(256<<10, 37)
		const repo = "image/arm64"
		digest, err := reg.PushBlob(context.Background(), repo, blob)
		if err != nil {
			t.Fatal(err)
		}
		// startProxyBin runs one executable: this script hands its
		// arguments to the binary under qemu.
		wrapper := filepath.Join(dir, "registry-proxy-arm64.sh")
		script := fmt.Sprintf("#!/bin/sh\nexec %s \"$@\"\n", strings.Join(argv, " "))
		if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
		px := startProxyBin(t, wrapper, "", "--upstream", mirroredRegistry+"="+reg.URL)
		resp, err := http.Get("http://" + px.Addr + "/v2/" + repo + "/blobs/" + digest + "?ns=" + mirroredRegistry)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		h := sha256.New()
		n, err := io.Copy(h, resp.Body)
		if resp.StatusCode != http.StatusOK || err != nil {
			t.Fatalf("GET the blob through the arm64 mirror: %s, %v", resp.Status, err)
		}
		if got := fmt.Sprintf("sha256:%x", h.Sum(nil)); got != digest || n != int64(len(blob)) {
			t.Errorf("the arm64 mirror served %d bytes of %s, want %d of %s", n, got, len(blob), digest)
		}
		if got := reg.BytesOf(digest); got < int64(len(blob)) {
			t.Errorf("the upstream sent %d bytes of the blob, want at least %d: it was not fetched through the mirror", got, len(blob))
		}
	})
}

// checkImageLayout checks the OCI layout in root as `make image` writes it:
// index.json names one image index of one manifest per default platform,
// each with that platform's config and one layer, every blob at the size
// and digest its descriptor says; each layer holds that platform's static
// binary. If extractTo is set, the binaries are written there; it returns
// their paths by platform.
func checkImageLayout(t *testing.T, root, extractTo string) map[string]string {
	t.Helper()
	readBlob := func(d v1.Descriptor) []byte {
		t.Helper()
		b, err := os.ReadFile(filepath.Join(root, "blobs", d.Digest.Algorithm, d.Digest.Hex))
		if err != nil {
			t.Fatalf("blob %s: %v", d.Digest, err)
		}
		if sum := fmt.Sprintf("sha256:%x", sha256.Sum256(b)); int64(len(b)) != d.Size || sum != d.Digest.String() {
			t.Fatalf("blob %s: %d bytes of %s, the descriptor says %d", d.Digest, len(b), sum, d.Size)
		}
		return b
	}
	decode := func(what string, b []byte, v any) {
		t.Helper()
		if err := json.Unmarshal(b, v); err != nil {
			t.Fatalf("%s: %v\n%s", what, err, b)
		}
	}
	b, err := os.ReadFile(filepath.Join(root, "oci-layout"))
	if err != nil {
		t.Fatal(err)
	}
	var version struct{ ImageLayoutVersion string }
	decode("oci-layout", b, &version)
	if version.ImageLayoutVersion != "1.0.0" {
		t.Errorf("oci-layout: %s", b)
	}
	if b, err = os.ReadFile(filepath.Join(root, "index.json")); err != nil {
		t.Fatal(err)
	}
	var top v1.IndexManifest
	decode("index.json", b, &top)
	if len(top.Manifests) != 1 || top.Manifests[0].MediaType != types.OCIImageIndex {
		t.Fatalf("index.json does not name one image index:\n%s", b)
	}
	// Kubernetes asks containerd for the image by this name.
	if got := top.Manifests[0].Annotations["io.containerd.image.name"]; got != testImageRef {
		t.Errorf("index.json names the image %q, want %q", got, testImageRef)
	}
	var idx v1.IndexManifest
	decode("image index", readBlob(top.Manifests[0]), &idx)
	want := imagebuild.DefaultPlatforms()
	if len(idx.Manifests) != len(want) {
		t.Fatalf("the image index has %d manifests, want one for each of %v", len(idx.Manifests), want)
	}
	machines := map[string]elf.Machine{"amd64": elf.EM_X86_64, "arm64": elf.EM_AARCH64, "arm": elf.EM_ARM}
	bins := map[string]string{}
	for i, md := range idx.Manifests {
		p := want[i]
		if md.Platform == nil || md.Platform.String() != p || md.MediaType != types.OCIManifestSchema1 {
			t.Errorf("manifest %d: %s for platform %v, want an OCI manifest for %s", i, md.MediaType, md.Platform, p)
			continue
		}
		var m v1.Manifest
		decode(p+" manifest", readBlob(md), &m)
		var cf v1.ConfigFile
		decode(p+" config", readBlob(m.Config), &cf)
		if got := cf.Platform(); got == nil || got.String() != p {
			t.Errorf("%s: the config says platform %v", p, got)
		}
		if len(cf.Config.Entrypoint) != 1 || cf.Config.Entrypoint[0] != imagebuild.BinaryPath {
			t.Errorf("%s: entrypoint %v, want %s", p, cf.Config.Entrypoint, imagebuild.BinaryPath)
		}
		if len(m.Layers) != 1 || m.Layers[0].MediaType != types.OCILayer || len(cf.RootFS.DiffIDs) != 1 {
			t.Errorf("%s: layers %v (diff ids %v), want one gzip layer", p, m.Layers, cf.RootFS.DiffIDs)
			continue
		}
		bin, diffID := binaryOfLayer(t, readBlob(m.Layers[0]))
		if diffID != cf.RootFS.DiffIDs[0].String() {
			t.Errorf("%s: the layer uncompressed is %s, the config's diff id %s", p, diffID, cf.RootFS.DiffIDs[0])
		}
		f, err := elf.NewFile(bytes.NewReader(bin))
		if err != nil {
			t.Errorf("%s: %s: %v", p, imagebuild.BinaryPath, err)
			continue
		}
		if f.Machine != machines[cf.Architecture] {
			t.Errorf("%s: the binary is for %v", p, f.Machine)
		}
		for _, prog := range f.Progs {
			if prog.Type == elf.PT_INTERP {
				t.Errorf("%s: the binary is dynamically linked, the image has no libc", p)
			}
		}
		if extractTo != "" {
			bins[p] = filepath.Join(extractTo, "registry-proxy-"+strings.ReplaceAll(p, "/", "-"))
			if err := os.MkdirAll(extractTo, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(bins[p], bin, 0o755); err != nil {
				t.Fatal(err)
			}
		}
	}
	return bins
}

// binaryOfLayer returns registry-proxy's binary from a gzipped layer, and
// the digest of the layer uncompressed.
func binaryOfLayer(t *testing.T, layer []byte) (bin []byte, diffID string) {
	t.Helper()
	zr, err := gzip.NewReader(bytes.NewReader(layer))
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	tr := tar.NewReader(io.TeeReader(zr, h))
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if "/"+hdr.Name == imagebuild.BinaryPath {
			if bin, err = io.ReadAll(tr); err != nil {
				t.Fatal(err)
			}
		}
	}
	// The tar's padding after its end marker counts in the digest.
	if _, err := io.Copy(h, zr); err != nil {
		t.Fatal(err)
	}
	if bin == nil {
		t.Fatalf("no %s in the layer", imagebuild.BinaryPath)
	}
	return bin, fmt.Sprintf("sha256:%x", h.Sum(nil))
}

// compareTarWithDir checks that the tarball holds exactly the regular files
// under dir, with the same contents.
func compareTarWithDir(t *testing.T, tarPath, dir string) {
	t.Helper()
	want := map[string]bool{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			rel, _ := filepath.Rel(dir, p)
			want[filepath.ToSlash(rel)] = true
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(tarPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if hdr.Typeflag != tar.TypeReg {
			continue
		}
		name := path.Clean(hdr.Name)
		got, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		if !want[name] {
			t.Errorf("%s in the tarball, not in the layout", hdr.Name)
			continue
		}
		delete(want, name)
		if b, err := os.ReadFile(filepath.Join(dir, filepath.FromSlash(name))); err != nil || !bytes.Equal(b, got) {
			t.Errorf("%s differs between the tarball and the layout (%v)", name, err)
		}
	}
	for name := range want {
		t.Errorf("%s in the layout, not in the tarball", name)
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
