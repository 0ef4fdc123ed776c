package integration

import (
	"context"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/docker/go-units"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/internal/ports"
	"github.com/registry-proxy/registry-proxy/internal/report"
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
func waitHeld(t testing.TB, c *cluster, holder int, blobs []string) {
	t.Helper()
	eventually(t, 30*time.Second, "containerd's blobs listed", func() bool {
		return scrape(t, c.nodes[holder]).Sum("registry_proxy_containerd_blobs") >= float64(len(blobs))
	})
	want := map[int]int{}
	for _, d := range blobs {
		o := owner.Of(d, c.ids)
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

// filesBytes is the bytes of the regular files under dirs.
func filesBytes(t *testing.T, dirs ...string) int64 {
	t.Helper()
	var n int64
	for _, dir := range dirs {
		err := filepath.WalkDir(dir, func(_ string, e fs.DirEntry, err error) error {
			if err != nil || !e.Type().IsRegular() {
				return err
			}
			fi, err := e.Info()
			if err == nil {
				n += fi.Size()
			}
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	return n
}

// After `crictl pull` through the mirror the node keeps the image once:
// in containerd's content store, the proxy having dropped its copy. Without
// the containerd source (the node as before) it is on disk twice.
func TestOneCopyOnDisk(t *testing.T) {
	reg, img := sharedImage(t)
	crictl := tool(t, "crictl")
	ref := mirroredRegistry + "/" + imageRepo + ":" + imageTag
	cfg := writeConfig(t, "[containerd]\nlist_interval = \"1s\"\n")
	for _, v := range containerds {
		for _, source := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/source=%v", v.name, source), func(t *testing.T) {
				listen, err := ports.FreePair("127.0.0.1")
				if err != nil {
					t.Fatal(err)
				}
				c := startContainerd(t, v, listen)
				args := []string{"--config", cfg, "--listen", listen, "--upstream", mirroredRegistry + "=" + reg.URL}
				if source {
					args = append(args, "--containerd-address", c.sock, "--containerd-namespace", "k8s.io", "--containerd-content-dir", c.contentDir())
				}
				px := startProxy(t, "", args...)
				ep := "unix://" + c.sock
				mustRun(t, 5*time.Minute, crictl, "--runtime-endpoint", ep, "--image-endpoint", ep, "--timeout", "4m", "pull", ref)
				image := filesBytes(t, filepath.Join(c.contentDir(), "blobs"))
				if image < imageBytes(img) || image > imageBytes(img)+1<<20 {
					t.Fatalf("containerd holds %d bytes of blobs, want the image's %d and its manifest and config", image, imageBytes(img))
				}
				disk := func() int64 { return filesBytes(t, px.DataDir, c.contentDir()) }
				if !source {
					if ratio := float64(disk()) / float64(image); ratio < 1.9 {
						t.Errorf("without the containerd source the node keeps %.3f× the image, want two copies", ratio)
					}
					t.Logf("%s without the containerd source: %d bytes on disk for an image of %d: %.3f×", v.name, disk(), image, float64(disk())/float64(image))
					return
				}
				eventually(t, time.Minute, "the proxy's copies are not dropped", func() bool { return float64(disk()) <= 1.05*float64(image) })
				t.Logf("%s with the containerd source: %d bytes on disk for an image of %d: %.3f×", v.name, disk(), image, float64(disk())/float64(image))
				if n := scrape(t, px).Sum("registry_proxy_store_bytes"); n != 0 {
					t.Errorf("the store counts %v bytes", n)
				}
				// Served again from containerd's copy.
				big := img.Layers[len(img.Layers)-1]
				before := reg.BlobBytes()
				n, d, err := getBlob(context.Background(), fmt.Sprintf("http://%s/v2/%s/blobs/%s?ns=%s", px.Addr, imageRepo, big.Digest, mirroredRegistry))
				if err != nil || n != big.Size || d.String() != big.Digest {
					t.Fatalf("blob from the mirror after the drop: %d bytes, %s, %v", n, d, err)
				}
				if got := reg.BlobBytes() - before; got != 0 {
					t.Errorf("%d blob bytes from the upstream after the drop", got)
				}
			})
		}
	}
}

// containerd killed and restarted while node-a serves a blob from its
// content store (through the API) to node-b: node-b completes the blob,
// verified, from the owner or the upstream; node-a serves containerd's
// content again once it is back.
func TestContainerdRestartWhileServing(t *testing.T) {
	reg, img := sharedImage(t)
	tar := imageTarball(t, reg, img)
	big := img.Layers[len(img.Layers)-1]
	for _, v := range containerds {
		t.Run(v.name, func(t *testing.T) {
			ca := startContainerd(t, v, "127.0.0.1:9")
			ca.ctrCmd(t, "images", "import", tar)
			c := newCluster(t, reg, []string{"node-a", "node-b"})
			up := []string{"--upstream", mirroredRegistry + "=" + reg.URL}
			c.nodes = append(c.nodes, c.startNode(t, 0, append(up, ca.containerdArgs(false)...)...),
				c.startNode(t, 1, append(up, "--config", writeConfig(t, "[download]\nrate = \"32MB\"\n"))...))
			c.waitMembers(t, 2)
			waitHeld(t, c, 0, imageBlobs(img))

			type result struct {
				n   int64
				d   digest.Digest
				err error
			}
			done := make(chan result, 1)
			go func() {
				n, d, err := getBlob(context.Background(), fmt.Sprintf("http://%s/v2/%s/blobs/%s?ns=%s", c.nodes[1].Addr, imageRepo, big.Digest, mirroredRegistry))
				done <- result{n, d, err}
			}()
			eventually(t, time.Minute, "node-a sends nothing", func() bool {
				return scrape(t, c.nodes[0]).Sum("registry_proxy_peer_upload_bytes_total") >= 16<<20
			})
			ca.kill()
			ca.start(t)
			r := <-done
			if r.err != nil || r.n != big.Size || r.d.String() != big.Digest {
				t.Fatalf("node-b's blob: %d bytes hashing to %s, %v; want %d of %s", r.n, r.d, r.err, big.Size, big.Digest)
			}
			waitOutput(t, c.nodes[0].proc, "containerd reachable again", time.Minute)
			if !strings.Contains(c.nodes[0].output(), "containerd not reachable") {
				t.Error("node-a did not log that containerd went away")
			}
		})
	}
}

// writeConfig writes a configuration file for a node.
func writeConfig(t *testing.T, body string) string {
	t.Helper()
	cfg := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(cfg, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return cfg
}

var (
	ctdSize  = flag.String("ctd-size", "1GiB", "BenchmarkContainerdServe: the blob a peer fetches")
	ctdModes = flag.String("ctd-modes", "store,containerd-files,containerd-api", "BenchmarkContainerdServe: where the holder keeps the blob (store is the reference)")
)

// ingestBlob puts b into c's content store (namespace rptest) as a GC root,
// as if an image had brought it.
func (c *containerdEnv) ingestBlob(t testing.TB, b []byte) digest.Digest {
	t.Helper()
	d := digest.FromBytes(b)
	f := filepath.Join(t.TempDir(), "blob")
	if err := os.WriteFile(f, b, 0o644); err != nil {
		t.Fatal(err)
	}
	in, err := os.Open(f)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	cmd := exec.Command(c.ctr, "--address", c.sock, "--namespace", "rptest", "content", "ingest",
		"--expected-size", fmt.Sprint(len(b)), "--expected-digest", d.String(), "bench-"+d.Encoded()[:12])
	cmd.Stdin = in
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("ctr content ingest: %v: %s", err, out)
	}
	c.ctrCmd(t, "content", "label", d.String(), "containerd.io/gc.root=bench")
	return d
}

// BenchmarkContainerdServe: `make bench-containerd`. A peer fetches one
// blob from a node that holds it in its own store, in containerd's content
// store read from its files, and through containerd's API: one after the
// other in each repetition, on loopback. MB/s of each, and containerd's
// against the store's.
func BenchmarkContainerdServe(b *testing.B) {
	size, err := units.RAMInBytes(*ctdSize)
	if err != nil {
		b.Fatal(err)
	}
	reg := startRegistry(b)
	blob := testregistry.RandomBytes(size, 77)
	d, err := reg.PushBlob(context.Background(), "cluster/blob", blob)
	if err != nil {
		b.Fatal(err)
	}
	ctd := startContainerd(b, containerds[len(containerds)-1], "127.0.0.1:9")
	if got := ctd.ingestBlob(b, blob); got.String() != d {
		b.Fatalf("ingested %s, pushed %s", got, d)
	}
	blob = nil
	modes := strings.Split(*ctdModes, ",")
	rates := map[string][]float64{}
	for range b.N {
		for run := range 3 {
			for _, mode := range modes {
				c := newCluster(b, reg, []string{"holder", "fetcher"})
				var args []string
				switch mode {
				case "containerd-files":
					args = ctd.containerdArgs(true)
				case "containerd-api":
					args = ctd.containerdArgs(false)
				}
				c.nodes = append(c.nodes, c.startNode(b, 0, args...), c.startNode(b, 1))
				c.waitMembers(b, 2)
				if mode == "store" {
					if _, err := fetchVerified(c.url(0, "cluster/blob", d), d); err != nil {
						b.Fatal(err)
					}
					waitStored(b, c.nodes[0], float64(size))
				} else {
					waitHeld(b, c, 0, []string{d})
				}
				before := reg.BlobBytes()
				start := time.Now()
				n, got, err := getBlob(context.Background(), c.url(1, "cluster/blob", d))
				secs := time.Since(start).Seconds()
				if err != nil || n != size || got.String() != d {
					b.Fatalf("%s: %d bytes, %s, %v", mode, n, got, err)
				}
				if up := reg.BlobBytes() - before; up != 0 {
					b.Fatalf("%s: the fetch took %d bytes from the upstream", mode, up)
				}
				rates[mode] = append(rates[mode], float64(size)/secs/1e6)
				b.Logf("run %d: %s: %.0f MB/s", run+1, mode, float64(size)/secs/1e6)
				for _, p := range c.nodes {
					p.stopProxy()
				}
			}
		}
	}
	for _, m := range modes {
		b.ReportMetric(report.MedianOf(rates[m]), m+"-MB/s")
	}
	if store := report.MedianOf(rates["store"]); store > 0 {
		for _, m := range modes[1:] {
			b.ReportMetric(report.MedianOf(rates[m])/store, m+"/store")
		}
	}
	b.ReportMetric(0, "ns/op")
}
