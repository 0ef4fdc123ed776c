package integration

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/registry-proxy/registry-proxy/p2p/owner"
)

// pull GETs url with an Authorization (empty: anonymous) and returns the
// status, the challenge and the body's sha256.
func pull(t *testing.T, method, url, authz string) (int, string, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, method, url, nil)
	if authz != "" {
		req.Header.Set("Authorization", authz)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	h := sha256.New()
	if _, err := io.Copy(h, resp.Body); err != nil {
		t.Fatalf("%s %s: body: %v", method, url, err)
	}
	return resp.StatusCode, resp.Header.Get("WWW-Authenticate"), "sha256:" + hex.EncodeToString(h.Sum(nil))
}

// Private content stays private, with the registry behind token auth and
// behind basic auth: an anonymous client (or one with other credentials) is
// refused on the mirror port, with the upstream's challenge, while the blob
// and the manifest are cached on its node and on a peer; an authorized
// client is served. The owner has no credentials, so the node whose client
// asked fetches the private blob itself, and the client's credential never
// reaches another node.
func TestPrivateContent(t *testing.T) {
	for _, mode := range []string{"token", "basic"} {
		t.Run(mode, func(t *testing.T) {
			reg := startRegistry(t)
			img, err := reg.PushImage(context.Background(), "team/private", "v1", []int64{6 << 20}, 21)
			if err != nil {
				t.Fatal(err)
			}
			layer, size := img.Layers[len(img.Layers)-1].Digest, img.Layers[len(img.Layers)-1].Size
			reg.ResetCounters()
			const token = "secret-pull-token-7f3a"
			var good string
			switch mode {
			case "token":
				reg.SetToken(token)
				reg.SetCredentials("alice", "wonderland")
				good = "Bearer " + token
			case "basic":
				reg.SetCredentials("alice", "wonderland")
				good = "Basic YWxpY2U6d29uZGVybGFuZA==" // alice:wonderland
			}
			bad := "Basic " + "bWFsbG9yeTpndWVzcw==" // mallory:guess

			ids := []string{"node-a", "node-b"}
			c := newCluster(t, reg, ids)
			for i := range ids {
				c.nodes = append(c.nodes, c.startNode(t, i))
			}
			c.waitMembers(t, 2)
			own := owner.Rank(layer, ids)[0]
			asker := 0
			if ids[0] == own {
				asker = 1
			}
			other := 1 - asker
			blob := func(i int) string { return c.url(i, "team/private", layer) }
			manifest := func(i int) string {
				return "http://" + c.nodes[i].Addr + "/v2/team/private/manifests/" + img.Digest + "?ns=" + clusterRegistry
			}

			// Anonymous before anything is cached: the upstream's challenge.
			if code, ch, _ := pull(t, "GET", blob(asker), ""); code != 401 || ch == "" {
				t.Fatalf("anonymous cold pull: %d, challenge %q", code, ch)
			}
			// The authorized client is served, by the node that asked: the owner
			// has no credentials for this registry.
			if code, _, got := pull(t, "GET", blob(asker), good); code != 200 || got != layer {
				t.Fatalf("authorized pull: %d, %s", code, got)
			}
			if code, _, _ := pull(t, "GET", manifest(asker), good); code != 200 {
				t.Fatalf("authorized manifest: %d", code)
			}
			st := stats(t, c.nodes[asker], layer)
			if st.Sources["upstream"] != size {
				t.Errorf("the asking node's sources %v: want the whole blob from the upstream", st.Sources)
			}
			// Cached now; anonymous and wrong credentials are refused on both
			// nodes, for GET and HEAD, blob and manifest.
			for _, i := range []int{asker, other} {
				for _, cred := range []string{"", bad} {
					for _, tc := range []struct{ method, url string }{
						{"GET", blob(i)}, {"HEAD", blob(i)}, {"GET", manifest(i)}, {"HEAD", manifest(i)},
					} {
						code, ch, _ := pull(t, tc.method, tc.url, cred)
						if code != 401 || ch == "" {
							t.Errorf("%s %s with %q: %d, challenge %q; want 401 with a challenge", tc.method, tc.url, cred, code, ch)
						}
					}
				}
				// The same blob under another repository name is no way in.
				code, _, _ := pull(t, "GET", c.url(i, "library/public", layer), "")
				if code == 200 {
					t.Errorf("node %d served the private blob under another repository anonymously", i)
				}
			}
			// The authorized client on the other node is served from the peer.
			before := reg.BlobBytes()
			if code, _, got := pull(t, "GET", blob(other), good); code != 200 || got != layer {
				t.Fatalf("authorized pull on the other node: %d, %s", code, got)
			}
			ost := stats(t, c.nodes[other], layer)
			t.Logf("other node's sources: %v; upstream blob bytes for it: %d", ost.Sources, reg.BlobBytes()-before)
			if ost.Sources[ids[asker]] == 0 {
				t.Errorf("the other node took nothing from its peer, which held the blob: %v", ost.Sources)
			}
			// No node logged the client's credential, in any form.
			for i, n := range c.nodes {
				secret := strings.TrimPrefix(strings.TrimPrefix(good, "Bearer "), "Basic ")
				if strings.Contains(n.output(), secret) {
					t.Errorf("node %d's log holds the client's credential", i)
				}
			}
		})
	}
}

// With p2p.share_private = false a private blob is neither sent to a peer
// nor fetched for one: the second node's authorized client is served from
// the registry, not from its peer, and the peer port has no piece of it;
// a public blob is still shared.
func TestSharePrivateOff(t *testing.T) {
	reg := startRegistry(t)
	ctx := context.Background()
	priv, err := reg.PushImage(ctx, "team/private", "v1", []int64{6 << 20}, 31)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := reg.PushImage(ctx, "library/public", "v1", []int64{6 << 20}, 32)
	if err != nil {
		t.Fatal(err)
	}
	reg.SetRepoCredentials("team/private", "alice", "wonderland")
	good := "Basic YWxpY2U6d29uZGVybGFuZA==" // alice:wonderland
	privLayer := priv.Layers[len(priv.Layers)-1]
	pubLayer := pub.Layers[len(pub.Layers)-1]

	ids := []string{"node-a", "node-b"}
	c := newCluster(t, reg, ids)
	cfg := writeTOML(t, "[p2p]\nshare_private = false\n")
	for i := range ids {
		c.nodes = append(c.nodes, c.startNode(t, i, "--config", cfg))
	}
	c.waitMembers(t, 2)
	get := func(i int, repo, d, authz string) {
		t.Helper()
		if code, _, got := pull(t, "GET", c.url(i, repo, d), authz); code != 200 || got != d {
			t.Fatalf("node %d, %s: %d %s", i, repo, code, got)
		}
	}
	for i := range ids {
		get(i, "team/private", privLayer.Digest, good)
		get(i, "library/public", pubLayer.Digest, "")
	}
	for i := range ids {
		st := stats(t, c.nodes[i], privLayer.Digest)
		if p := peerBytes(st); p != 0 || st.Sources["upstream"] != privLayer.Size {
			t.Errorf("node %d's private blob: sources %v; want all from the registry, nothing from a peer", i, st.Sources)
		}
	}
	if n := reg.BytesOf(privLayer.Digest); n != 2*privLayer.Size {
		t.Errorf("the registry sent the private blob %d bytes; want it once per node, %d", n, 2*privLayer.Size)
	}
	peerPub := peerBytes(stats(t, c.nodes[0], pubLayer.Digest)) + peerBytes(stats(t, c.nodes[1], pubLayer.Digest))
	if peerPub == 0 {
		t.Errorf("the public blob went from no peer to the other")
	}
	// A member asking node-a's peer port for a piece of the private blob
	// gets nothing.
	ident := mintIdentity(t, c.secret, "node-b")
	client := &http.Client{Transport: &http.Transport{DialContext: fromIP("127.0.0.1"), TLSClientConfig: ident.ClientConfig()}}
	defer client.CloseIdleConnections()
	resp, err := client.Get("https://" + c.peers[0] + "/pieces/" + privLayer.Digest + "/0")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	code := resp.StatusCode
	if code == 200 {
		t.Errorf("node-a's peer port sent a piece of a private blob with share_private = false")
	}
	t.Logf("private blob from the registry to each node (%d bytes in all); public blob %d bytes between peers; a private piece asked of a peer: %d",
		reg.BytesOf(privLayer.Digest), peerPub, code)
}
