package integration

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"

	"github.com/registry-proxy/registry-proxy/internal/ports"
	"github.com/registry-proxy/registry-proxy/internal/probe"
	"github.com/registry-proxy/registry-proxy/internal/testregistry"
	"github.com/registry-proxy/registry-proxy/p2p/owner"
	"github.com/registry-proxy/registry-proxy/p2p/pb"
	"github.com/registry-proxy/registry-proxy/p2p/trust"
	"github.com/registry-proxy/registry-proxy/task"
)

const clusterRegistry = "cluster.invalid"

// cluster is n proxies on loopback joined together, one upstream.
type cluster struct {
	reg    *testregistry.Registry
	nodes  []*proxy
	peers  []string
	ids    []string
	secret string // the cluster secret's file
}

func startCluster(t *testing.T, n int, extra ...string) *cluster {
	t.Helper()
	var ids []string
	for i := 0; i < n; i++ {
		ids = append(ids, fmt.Sprintf("node-%c", 'a'+i))
	}
	c := newCluster(t, startRegistry(t), ids)
	for i := 0; i < n; i++ {
		c.nodes = append(c.nodes, c.startNode(t, i, extra...))
	}
	c.waitMembers(t, n)
	return c
}

// newCluster reserves peer addresses for ids; the test starts the nodes.
func newCluster(t testing.TB, reg *testregistry.Registry, ids []string) *cluster {
	t.Helper()
	c := &cluster{reg: reg, ids: ids, secret: writeSecret(t)}
	for range ids {
		pa, err := ports.FreePair("127.0.0.1")
		if err != nil {
			t.Fatal(err)
		}
		c.peers = append(c.peers, pa)
	}
	return c
}

func (c *cluster) startNode(t testing.TB, i int, extra ...string) *proxy {
	return c.startNodeBin(t, i, *proxyBin, extra...)
}

// startNodeBin starts node i from another build of the binary. A peer
// port reserved free but taken before the node bound it (another process's
// connection) gets new ports, a few times.
func (c *cluster) startNodeBin(t testing.TB, i int, bin string, extra ...string) *proxy {
	t.Helper()
	for attempt := 1; ; attempt++ {
		args := []string{"--upstream", clusterRegistry + "=" + c.reg.URL, "--node-id", c.ids[i], "--peer-listen", c.peers[i]}
		if c.secret != "" {
			args = append(args, "--cluster-secret", c.secret)
		}
		if i > 0 {
			args = append(args, "--join", c.peers[0])
		} else if len(c.peers) > 1 {
			args = append(args, "--join", c.peers[1])
		}
		px, err := tryStartProxyBin(t, bin, "", append(args, extra...)...)
		if err == nil {
			return px
		}
		if !errors.Is(err, errPortTaken) || attempt == 3 {
			t.Fatal(err)
		}
		t.Logf("%s: peer port %s taken meanwhile; new ports", c.ids[i], c.peers[i])
		if c.peers[i], err = ports.FreePair("127.0.0.1"); err != nil {
			t.Fatal(err)
		}
	}
}

// waitMembers waits until every running node sees n members.
func (c *cluster) waitMembers(t testing.TB, n int) {
	t.Helper()
	var mirrors []string
	for _, p := range c.nodes {
		mirrors = append(mirrors, "http://"+p.Admin)
	}
	if err := probe.WaitMembers(context.Background(), mirrors, n, 20*time.Second); err != nil {
		t.Fatal(err)
	}
}

func (c *cluster) url(i int, repo, d string) string {
	return "http://" + c.nodes[i].Addr + "/v2/" + repo + "/blobs/" + d + "?ns=" + clusterRegistry
}

func stats(t testing.TB, p *proxy, d string) task.Stats {
	t.Helper()
	st, err := probe.Blob(context.Background(), "http://"+p.Admin, d)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func peerBytes(st task.Stats) (peer int64) {
	for src, n := range st.Sources {
		if src != "upstream" {
			peer += n
		}
	}
	return peer
}

// memberConn is a gRPC connection to node 0's peer port as a member with
// the secret in file secret.
func (c *cluster) memberConn(t testing.TB, secret, id string) *grpc.ClientConn {
	t.Helper()
	secrets, err := trust.ReadSecretFile(secret)
	if err != nil {
		t.Fatal(err)
	}
	ident, err := trust.NewIdentity(secrets, id, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	cc, err := grpc.NewClient("passthrough:///"+c.peers[0], grpc.WithTransportCredentials(credentials.NewTLS(ident.ClientConfig())))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

// writeSecret writes a fresh cluster secret into a file of the test's.
func writeSecret(t testing.TB) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "cluster-secret")
	if err := os.WriteFile(p, []byte(trust.NewSecret()+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func pushBlob(t testing.TB, reg *testregistry.Registry, size int64, seed uint64) string {
	t.Helper()
	d, err := reg.PushBlob(context.Background(), "cluster/blob", testregistry.RandomBytes(size, seed))
	if err != nil {
		t.Fatal(err)
	}
	reg.ResetCounters()
	return d
}

func TestClusterSequentialPulls(t *testing.T) {
	c := startCluster(t, 3)
	const size = 256 << 20
	d := pushBlob(t, c.reg, size, 11)
	for i := range c.nodes {
		if _, err := fetchVerified(c.url(i, "cluster/blob", d), d); err != nil {
			t.Fatalf("pull through %s: %v", c.ids[i], err)
		}
		t.Logf("after %s: upstream sent %d bytes (%.2f x blob)", c.ids[i], c.reg.BlobBytes(), float64(c.reg.BlobBytes())/size)
	}
	if got := c.reg.BlobBytes(); got > size*11/10 {
		t.Errorf("upstream sent %d bytes for three pulls of a %d byte blob (%.2f x)", got, size, float64(got)/size)
	}
	// One node, the digest's owner, fetched from upstream; every other node
	// got its pieces from peers.
	owners := 0
	for i, p := range c.nodes {
		st := stats(t, p, d)
		t.Logf("%s: %v", c.ids[i], st.Sources)
		if st.Sources["upstream"] > 0 {
			owners++
			continue
		}
		if pb := peerBytes(st); pb != size {
			t.Errorf("%s: %d of %d bytes from peers (sources %v)", c.ids[i], pb, size, st.Sources)
		}
	}
	if owners != 1 {
		t.Errorf("%d nodes fetched from upstream, want 1", owners)
	}
}

func TestClusterConcurrentColdPull(t *testing.T) {
	c := startCluster(t, 4)
	const size = 256 << 20
	d := pushBlob(t, c.reg, size, 12)
	var wg sync.WaitGroup
	errs := make([]error, len(c.nodes))
	for i := range c.nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = fetchVerified(c.url(i, "cluster/blob", d), d)
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("%s: %v", c.ids[i], err)
		}
	}
	got := c.reg.BlobBytes()
	t.Logf("4 nodes at once: upstream sent %.3f x the blob", float64(got)/size)
	if got > size*11/10 {
		t.Errorf("upstream sent %d bytes (%.2f x blob), want <= 1.1 x", got, float64(got)/size)
	}
	for i, p := range c.nodes {
		st := stats(t, p, d)
		t.Logf("%s: %v", c.ids[i], st.Sources)
	}
}

// A node pulling while its parents die still completes with the right
// digest: the owner killed mid-transfer, then the rest from whoever is left.
func TestClusterOwnerKilledMidTransfer(t *testing.T) {
	c := startCluster(t, 3)
	const size = 128 << 20
	d := pushBlob(t, c.reg, size, 13)
	c.reg.SetPace(32 << 20) // slow enough to kill mid-way
	// Find the owner: the node that fetches upstream for a pull through another.
	got := make(chan error, 1)
	go func() { _, err := fetchVerified(c.url(0, "cluster/blob", d), d); got <- err }()
	deadline := time.Now().Add(20 * time.Second)
	for c.reg.BlobBytes() < size/4 {
		if time.Now().After(deadline) {
			t.Fatal("no progress upstream")
		}
		time.Sleep(20 * time.Millisecond)
	}
	ownerIdx := -1
	for i, p := range c.nodes {
		if strings.Contains(p.output(), `"from_upstream"`) || stats(t, p, d).Sources["upstream"] > 0 {
			ownerIdx = i
		}
	}
	if ownerIdx < 0 {
		t.Fatal("no node is fetching upstream")
	}
	t.Logf("owner %s killed at %d upstream bytes", c.ids[ownerIdx], c.reg.BlobBytes())
	c.nodes[ownerIdx].cmd.Process.Kill()
	if ownerIdx == 0 {
		// The client's own node died: pull again through another.
		<-got
		go func() { _, err := fetchVerified(c.url(1, "cluster/blob", d), d); got <- err }()
	}
	select {
	case err := <-got:
		if err != nil {
			t.Fatalf("pull after the owner died: %v", err)
		}
	case <-time.After(2 * time.Minute):
		t.Fatal("pull did not finish after the owner died")
	}
}

func fetchVerified(url, d string) (int64, error) {
	n, got, err := getBlob(context.Background(), url)
	if err != nil {
		return n, err
	}
	if got != digest.Digest(d) {
		return n, fmt.Errorf("got digest %s, want %s", got, d)
	}
	return n, nil
}

// The digest's owner sends corrupt pieces: its children detect them by
// checksum, block it, and finish from the upstream; nothing bad is served.
func TestClusterCorruptParent(t *testing.T) {
	reg := startRegistry(t)
	const size = 64 << 20
	d := pushBlob(t, reg, size, 14)
	ids := []string{"node-a", "node-b", "node-c"}
	ownerID := owner.Rank(d, ids)[0]
	c := newCluster(t, reg, ids)
	child := -1
	for i, id := range ids {
		if id == ownerID {
			t.Setenv("REGISTRY_PROXY_FAULTS", "corrupt")
			c.nodes = append(c.nodes, c.startNodeBin(t, i, *faultyBin))
		} else {
			t.Setenv("REGISTRY_PROXY_FAULTS", "")
			child = i
			c.nodes = append(c.nodes, c.startNode(t, i))
		}
	}
	c.waitMembers(t, len(ids))
	if _, err := fetchVerified(c.url(child, "cluster/blob", d), d); err != nil {
		t.Fatalf("pull through %s with a corrupt owner: %v", ids[child], err)
	}
	out := c.nodes[child].output()
	if !strings.Contains(out, "piece checksum mismatch") || !strings.Contains(out, ownerID) {
		t.Errorf("%s did not report the owner's bad pieces", ids[child])
	}
	if st := stats(t, c.nodes[child], d); st.Sources[ownerID] != 0 {
		t.Errorf("bytes from the corrupt owner were kept: %v", st.Sources)
	}
}

// Nodes that cut a blob into pieces of another size (pieces.min_size set
// differently) do not use each other's pieces: the node says why, takes the
// blob from the upstream, and serves it verified.
func TestClusterPieceSizeMismatch(t *testing.T) {
	reg := startRegistry(t)
	const size = 16 << 20
	d := pushBlob(t, reg, size, 15)
	ids := []string{"node-a", "node-b"}
	c := newCluster(t, reg, ids)
	c.nodes = append(c.nodes, c.startNode(t, 0), c.startNode(t, 1, "--config", writeTOML(t, "[pieces]\nmin_size = \"4MiB\"\n")))
	c.waitMembers(t, len(ids))
	holder, other := 0, 1
	if owner.Rank(d, ids)[0] == ids[1] {
		holder, other = 1, 0
	}
	if _, err := fetchVerified(c.url(holder, "cluster/blob", d), d); err != nil {
		t.Fatal(err)
	}
	if _, err := fetchVerified(c.url(other, "cluster/blob", d), d); err != nil {
		t.Fatalf("pull through %s: %v", ids[other], err)
	}
	if out := c.nodes[other].output(); !strings.Contains(out, "pieces.min_size the same on every node") || !strings.Contains(out, ids[holder]) {
		t.Errorf("%s did not say why it ignored %s's pieces", ids[other], ids[holder])
	}
	st := stats(t, c.nodes[other], d)
	if st.Sources[ids[holder]] != 0 || st.Sources["upstream"] != size {
		t.Errorf("%s's bytes by source: %v, want all %d from the upstream", ids[other], st.Sources, size)
	}
}

// One parent throttled to 4 MB/s among idle ones: with selector=state the
// child takes few pieces from it; FCFS takes them from whoever announced first.
func TestClusterThrottledParent(t *testing.T) {
	const size = 64 << 20
	for _, sel := range []string{"state", "fcfs"} {
		t.Run(sel, func(t *testing.T) {
			reg := startRegistry(t)
			d := pushBlob(t, reg, size, 15)
			ids := []string{"node-a", "node-b", "node-c", "node-d"}
			rank := owner.Rank(d, ids)
			throttled, puller, other := rank[1], rank[2], rank[3]
			c := newCluster(t, reg, ids)
			idx := map[string]int{}
			for i, id := range ids {
				idx[id] = i
				args := []string{"--selector", sel, "--config", writeTOML(t, "[upload.syncer]\ninterval = \"500ms\"\n")}
				if id == throttled {
					args[3] = writeTOML(t, "[upload]\nrate = \"4MB\"\n[upload.syncer]\ninterval = \"500ms\"\n")
				}
				c.nodes = append(c.nodes, c.startNode(t, i, args...))
			}
			c.waitMembers(t, len(ids))
			for _, id := range []string{throttled, other} {
				if _, err := fetchVerified(c.url(idx[id], "cluster/blob", d), d); err != nil {
					t.Fatal(err)
				}
			}
			start := time.Now()
			if _, err := fetchVerified(c.url(idx[puller], "cluster/blob", d), d); err != nil {
				t.Fatal(err)
			}
			took := time.Since(start)
			st := stats(t, c.nodes[idx[puller]], d)
			share := float64(st.Sources[throttled]) / size
			t.Logf("selector=%s: %s pulled 64 MiB in %v; bytes by parent %v; throttled parent %s sent %.0f%%", sel, puller, took.Round(time.Millisecond), st.Sources, throttled, 100*share)
			if sel == "state" && share > 0.2 {
				t.Errorf("state selection took %.0f%% from the throttled parent", 100*share)
			}
		})
	}
}

func writeTOML(t testing.TB, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "c.toml")
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// A real containerd pulls, through one node, an image whose layers other
// nodes already hold: the layers come from peers, not the upstream.
func TestClusterContainerdPullsFromPeers(t *testing.T) {
	needRoot(t)
	_, img := sharedImage(t)
	c := startCluster(t, 3)
	// The cluster's upstream is a registry of its own: copy the image there.
	img2, err := c.reg.PushImage(context.Background(), imageRepo, imageTag, layerFiles, 7)
	if err != nil {
		t.Fatal(err)
	}
	if img2.Digest != img.Digest {
		t.Fatalf("image differs: %s vs %s", img2.Digest, img.Digest)
	}
	// Nodes 0 and 1 pull the layers first.
	for _, i := range []int{0, 1} {
		for _, l := range img2.Layers {
			if _, err := fetchVerified(c.url(i, imageRepo, l.Digest), l.Digest); err != nil {
				t.Fatal(err)
			}
		}
	}
	before := c.reg.BlobBytes()
	ctd := startContainerd(t, containerds[0], c.nodes[2].Addr)
	writeHostsDir(t, ctd.hosts, clusterRegistry, c.nodes[2].Addr)
	ref := clusterRegistry + "/" + imageRepo + ":" + imageTag
	ctd.ctrCmd(t, "images", "pull", "--hosts-dir", ctd.hosts, "--snapshotter", "native", ref)
	checkUnpacked(t, ctd.dir+"/root")
	// Only the image config, which nobody had, may come from upstream now.
	if extra := c.reg.BlobBytes() - before; extra > 1<<20 {
		t.Errorf("containerd's pull took %d blob bytes from upstream; the layers should come from peers", extra)
	}
	// Layers node 2 owns it fetched from upstream when node 0 asked for
	// them; every other layer reached it from peers.
	checked := 0
	for _, l := range img2.Layers {
		if owner.Rank(l.Digest, c.ids)[0] == c.ids[2] {
			continue
		}
		checked++
		st := stats(t, c.nodes[2], l.Digest)
		if p := peerBytes(st); p != l.Size || st.Sources["upstream"] > 0 {
			t.Errorf("layer %s on node 2: sources %v, want all %d bytes from peers", l.Digest, st.Sources, l.Size)
		}
	}
	t.Logf("%d of %d layers checked as coming from peers", checked, len(img2.Layers))
}

// The peer port answers gRPC health checks and lists its services by
// reflection, as grpcurl uses them.
func TestPeerGRPCHealthAndReflection(t *testing.T) {
	c := startCluster(t, 1)
	cc := c.memberConn(t, c.secret, "test-child")
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	h, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil || h.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health: %v %v", h, err)
	}
	st, err := reflectionpb.NewServerReflectionClient(cc).ServerReflectionInfo(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}}); err != nil {
		t.Fatal(err)
	}
	resp, err := st.Recv()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, s := range resp.GetListServicesResponse().GetService() {
		names = append(names, s.GetName())
	}
	for _, want := range []string{"registryproxy.p2p.v1.HostSync", "registryproxy.p2p.v1.Pieces", "registryproxy.p2p.v1.Tracker", "grpc.health.v1.Health"} {
		if !slices.Contains(names, want) {
			t.Errorf("service %s not listed: %v", want, names)
		}
	}
	for _, want := range []string{"registryproxy.p2p.v1.Manifests"} {
		if !slices.Contains(names, want) {
			t.Errorf("service %s not listed: %v", want, names)
		}
	}
	// SyncHost answers only members: test-child holds the secret but is
	// none (TestPeerPortMembersOnly has a member get the host state).
	hs, err := pb.NewHostSyncClient(cc).SyncHost(ctx, &pb.SyncHostRequest{HostId: "test-child"})
	if err == nil {
		_, err = hs.Recv()
	}
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("SyncHost to a non-member: %v, want PermissionDenied", err)
	}
}

// A parent that is not the owner dies mid-transfer: its pieces are fetched
// again from the others and the pull completes with the right digest.
func TestClusterParentKilledMidTransfer(t *testing.T) {
	reg := startRegistry(t)
	const size = 48 << 20
	d := pushBlob(t, reg, size, 16)
	ids := []string{"node-a", "node-b", "node-c"}
	rank := owner.Rank(d, ids)
	victim, puller := rank[1], rank[2]
	c := newCluster(t, reg, ids)
	idx := map[string]int{}
	// The victim is the better parent (16 MB/s against the owner's 4), so
	// the puller is taking most pieces from it when it dies.
	rates := map[string]string{rank[0]: "4MB", victim: "16MB", puller: "0"}
	for i, id := range ids {
		idx[id] = i
		cfg := writeTOML(t, "[upload]\nrate = \""+rates[id]+"\"\n[upload.syncer]\ninterval = \"500ms\"\n")
		c.nodes = append(c.nodes, c.startNode(t, i, "--config", cfg))
	}
	c.waitMembers(t, len(ids))
	if _, err := fetchVerified(c.url(idx[victim], "cluster/blob", d), d); err != nil {
		t.Fatal(err)
	}
	got := make(chan error, 1)
	go func() { _, err := fetchVerified(c.url(idx[puller], "cluster/blob", d), d); got <- err }()
	time.Sleep(1500 * time.Millisecond) // the puller is taking pieces from both
	c.nodes[idx[victim]].cmd.Process.Kill()
	select {
	case err := <-got:
		if err != nil {
			t.Fatalf("pull after a parent died: %v", err)
		}
	case <-time.After(2 * time.Minute):
		t.Fatal("pull did not finish")
	}
	st := stats(t, c.nodes[idx[puller]], d)
	t.Logf("puller's sources after %s died: %v", victim, st.Sources)
	if st.Sources[victim] == 0 || st.Sources[victim] == size {
		t.Errorf("the victim sent %d bytes: it should have died mid-transfer", st.Sources[victim])
	}
}

// /readyz (admin listener): a node whose seed is not up yet is not ready; it
// is once it has joined (fast, as it retries while alone). A node with no
// seeds is ready at once.
func TestReadyWhenJoined(t *testing.T) {
	reg := startRegistry(t)
	c := newCluster(t, reg, []string{"node-a", "node-b"})
	readyz := func(p *proxy) (int, string) {
		resp, err := http.Get("http://" + p.Admin + "/readyz")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	cfg := writeTOML(t, "[p2p]\nalone_after = \"10m\"\n")
	b := startProxy(t, "", "--upstream", clusterRegistry+"="+reg.URL, "--node-id", "node-b", "--peer-listen", c.peers[1],
		"--cluster-secret", c.secret, "--join", c.peers[0], "--config", cfg)
	if code, body := readyz(b); code != http.StatusServiceUnavailable {
		t.Fatalf("node-b before its seed is up: %d %s", code, body)
	}
	// The seed: no --join of its own, so ready at once.
	a := startProxy(t, "", "--upstream", clusterRegistry+"="+reg.URL, "--node-id", "node-a", "--peer-listen", c.peers[0],
		"--cluster-secret", c.secret)
	if code, body := readyz(a); code != http.StatusOK {
		t.Fatalf("node-a without seeds: %d %s", code, body)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		code, body := readyz(b)
		if code == http.StatusOK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("node-b not ready 30 s after its seed came up: %d %s", code, body)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
