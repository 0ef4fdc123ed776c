package integration

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/registry-proxy/registry-proxy/internal/testregistry"
	"github.com/registry-proxy/registry-proxy/p2p/owner"
)

// imageTarball writes the test image as `docker save` would, tagged with
// the mirrored name, for `ctr images import`.
func imageTarball(t *testing.T, reg *testregistry.Registry, img *testregistry.Image) string {
	t.Helper()
	src, err := name.ParseReference(fmt.Sprintf("%s/%s:%s", reg.Host, img.Repo, img.Tag), name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	im, err := remote.Image(src)
	if err != nil {
		t.Fatal(err)
	}
	tag, err := name.NewTag(mirroredRegistry + "/" + img.Repo + ":" + img.Tag)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "image.tar")
	if err := tarball.WriteToFile(path, tag, im); err != nil {
		t.Fatal(err)
	}
	return path
}

// imageBlobs are the image's layer and config digests.
func imageBlobs(img *testregistry.Image) []string {
	out := []string{img.Config}
	for _, l := range img.Layers {
		out = append(out, l.Digest)
	}
	return out
}

// contentDir is where a test containerd keeps its blob files.
func (c *containerdEnv) contentDir() string {
	return filepath.Join(c.dir, "root", "io.containerd.content.v1.content")
}

// containerdArgs has a node serve c's content store.
func (c *containerdEnv) containerdArgs(files bool) []string {
	args := []string{"--containerd-address", c.sock, "--containerd-namespace", "rptest"}
	if files {
		args = append(args, "--containerd-content-dir", c.contentDir())
	} else {
		args = append(args, "--containerd-content-dir", filepath.Join(c.dir, "not-mounted"))
	}
	return args
}

// waitHeld waits until node holder's containerd lists the blobs and every
// other node in c has been told of those it owns.
func waitHeld(t *testing.T, c *cluster, holder int, blobs []string) {
	t.Helper()
	eventually(t, 30*time.Second, "containerd's blobs listed", func() bool {
		return scrape(t, c.nodes[holder]).Sum("registry_proxy_containerd_blobs") >= float64(len(blobs))
	})
	want := map[int]int{}
	for _, d := range blobs {
		o := owner.Rank(d, c.ids)[0]
		for i, id := range c.ids {
			if id == o && i != holder {
				want[i]++
			}
		}
	}
	for i, n := range want {
		eventually(t, 30*time.Second, fmt.Sprintf("%s told of %d held blobs", c.ids[i], n), func() bool {
			return scrape(t, c.nodes[i]).Sum("registry_proxy_tracker_holdings") >= float64(n)
		})
	}
}

// An image that node-a's containerd imported from a tarball (it never came
// through a registry or a mirror) is pulled on node-b through its mirror
// with no blob byte from the upstream: node-a serves it from containerd's
// content store, announced to the digests' owners.
func TestContainerdImportedImageServed(t *testing.T) {
	reg, img := sharedImage(t)
	tar := imageTarball(t, reg, img)
	ref := mirroredRegistry + "/" + imageRepo + ":" + imageTag
	for _, v := range containerds {
		t.Run(v.name, func(t *testing.T) {
			ca := startContainerd(t, v, "127.0.0.1:9") // pulls nothing
			ca.ctrCmd(t, "images", "import", tar)
			c := newCluster(t, reg, []string{"node-a", "node-b"})
			up := []string{"--upstream", mirroredRegistry + "=" + reg.URL}
			c.nodes = append(c.nodes, c.startNode(t, 0, append(up, ca.containerdArgs(true)...)...), c.startNode(t, 1, up...))
			c.waitMembers(t, 2)
			waitHeld(t, c, 0, imageBlobs(img))

			cb := startContainerd(t, containerds[len(containerds)-1], c.nodes[1].Addr)
			before := reg.BlobBytes()
			cb.ctrCmd(t, "images", "pull", "--hosts-dir", cb.hosts, "--snapshotter", "native", ref)
			checkUnpacked(t, cb.dir+"/root")
			if got := reg.BlobBytes() - before; got != 0 {
				t.Errorf("the pull on node-b took %d blob bytes from the upstream, want 0", got)
			}
			if sent := scrape(t, c.nodes[0]).Sum("registry_proxy_peer_upload_bytes_total"); sent < float64(imageBytes(img)) {
				t.Errorf("node-a sent %v bytes to peers, want at least the layers' %d", sent, imageBytes(img))
			}
			// node-a's own store holds nothing: it served containerd's.
			if n := scrape(t, c.nodes[0]).Sum("registry_proxy_store_bytes"); n != 0 {
				t.Errorf("node-a stored %v bytes of its own", n)
			}
			if !strings.Contains(cb.ctrCmd(t, "images", "ls"), ref) {
				t.Errorf("image %s not listed on node-b", ref)
			}
		})
	}
}

// A client of node-a itself reads a blob containerd holds from the mirror
// (X-Registry-Proxy-Source: containerd), through containerd's files and
// through its API alike.
func TestContainerdBlobServedToClient(t *testing.T) {
	reg, img := sharedImage(t)
	tar := imageTarball(t, reg, img)
	v := containerds[len(containerds)-1]
	ca := startContainerd(t, v, "127.0.0.1:9")
	ca.ctrCmd(t, "images", "import", tar)
	big := img.Layers[len(img.Layers)-1]
	for _, files := range []bool{true, false} {
		t.Run(fmt.Sprintf("files=%v", files), func(t *testing.T) {
			px := startProxy(t, "", append([]string{"--upstream", mirroredRegistry + "=" + reg.URL}, ca.containerdArgs(files)...)...)
			eventually(t, 30*time.Second, "containerd's blobs listed", func() bool {
				return scrape(t, px).Sum("registry_proxy_containerd_blobs") >= float64(len(imageBlobs(img)))
			})
			before := reg.BlobBytes()
			url := fmt.Sprintf("http://%s/v2/%s/blobs/%s?ns=%s", px.Addr, imageRepo, big.Digest, mirroredRegistry)
			n, d, err := getBlob(context.Background(), url)
			if err != nil {
				t.Fatal(err)
			}
			if n != big.Size || d.String() != big.Digest {
				t.Fatalf("got %d bytes hashing to %s, want %d of %s", n, d, big.Size, big.Digest)
			}
			if got := reg.BlobBytes() - before; got != 0 {
				t.Errorf("%d blob bytes from the upstream, want 0", got)
			}
			if got := scrape(t, px).Sum("registry_proxy_blob_bytes_total", `source="containerd"`); got != float64(big.Size) {
				t.Errorf("%v bytes counted from containerd, want %d", got, big.Size)
			}
			mode := "api"
			if files {
				mode = "files in"
			}
			if !strings.Contains(px.output(), `"reads":"`+mode) {
				t.Errorf("the log does not say containerd's blobs are read by %s", mode)
			}
		})
	}
}
