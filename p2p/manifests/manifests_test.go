package manifests

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/registry-proxy/registry-proxy/p2p/membership"
	"github.com/registry-proxy/registry-proxy/p2p/owner"
	"github.com/registry-proxy/registry-proxy/p2p/pb"
	"github.com/registry-proxy/registry-proxy/proxy/upstream"
)

const indexType = "application/vnd.oci.image.index.v1+json"

// memStore is a node's manifests.
type memStore struct {
	mu sync.Mutex
	m  map[digest.Digest][2]string
}

func (s *memStore) GetManifest(d digest.Digest) (string, []byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	v, ok := s.m[d]
	if !ok {
		return "", nil, errors.New("not found")
	}
	return v[0], []byte(v[1]), nil
}

func (s *memStore) PutManifest(d digest.Digest, mt string, content []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.m[d] = [2]string{mt, string(content)}
	return nil
}

// registry serves manifests by digest with the node credentials it accepts
// and counts GETs; while down it answers nothing.
type registry struct {
	manifests map[digest.Digest][]byte
	refuse    bool
	down      atomic.Bool
	gets      atomic.Int64
	release   chan struct{} // when set, a GET waits for it
}

func (r *registry) Manifest(ctx context.Context, method, _, _, ref string, _ http.Header) (*http.Response, error) {
	if r.down.Load() {
		return nil, fmt.Errorf("%w: connection refused", upstream.ErrUnavailable)
	}
	if r.refuse {
		return nil, &upstream.StatusError{Code: http.StatusUnauthorized}
	}
	r.gets.Add(1)
	if r.release != nil {
		select {
		case <-r.release:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	b, ok := r.manifests[digest.Digest(ref)]
	if !ok {
		return nil, &upstream.StatusError{Code: http.StatusNotFound}
	}
	return &http.Response{StatusCode: 200, Header: http.Header{"Content-Type": []string{indexType}}, ContentLength: int64(len(b)), Body: io.NopCloser(bytes.NewReader(b))}, nil
}

type members []membership.Member

func (m members) Members() []membership.Member { return m }

// net routes peer calls to the clusters by address; a call from a node the
// cluster does not know is refused as the peer port would.
type net struct {
	nodes map[string]*Cluster // by address
	lie   map[string]bool     // addresses whose GetManifest sends other bytes
	puts  chan *pb.TagRecord
}

type callerKey struct{}

type auth struct{ ms members }

func (a auth) Caller(ctx context.Context, claimed string) (membership.Member, error) {
	from, _ := ctx.Value(callerKey{}).(string)
	for _, m := range a.ms {
		if m.ID == from && from == claimed {
			return m, nil
		}
	}
	return membership.Member{}, status.Errorf(codes.PermissionDenied, "%q is not a member", from)
}

func (n *net) GetManifest(ctx context.Context, addr string, req *pb.GetManifestRequest) (*pb.Manifest, error) {
	resp, err := n.nodes[addr].GetManifest(context.WithValue(ctx, callerKey{}, req.GetHostId()), req)
	if err == nil && n.lie[addr] {
		resp.Content = append([]byte(nil), resp.Content...)
		resp.Content[0] ^= 1
	}
	return resp, err
}

func (n *net) PutTag(ctx context.Context, addr string, rec *pb.TagRecord) error {
	_, err := n.nodes[addr].PutTag(context.WithValue(ctx, callerKey{}, rec.GetHostId()), rec)
	if n.puts != nil {
		n.puts <- rec
	}
	return err
}

func (n *net) GetTag(ctx context.Context, addr string, req *pb.TagRequest) (*pb.TagRecord, error) {
	return n.nodes[addr].GetTag(context.WithValue(ctx, callerKey{}, req.GetHostId()), req)
}

// cluster makes n nodes on one registry; node i is "node-i" at "addr-i".
func cluster(t *testing.T, n int, reg *registry) ([]*Cluster, *net) {
	t.Helper()
	var ms members
	for i := range n {
		ms = append(ms, membership.Member{ID: fmt.Sprintf("node-%d", i), Addr: fmt.Sprintf("addr-%d", i)})
	}
	nw := &net{nodes: map[string]*Cluster{}, lie: map[string]bool{}}
	var cs []*Cluster
	for _, m := range ms {
		c := New(Options{Self: m, Members: ms, Auth: auth{ms}, Transport: nw, Store: &memStore{m: map[digest.Digest][2]string{}},
			Upstream: reg, Timeout: time.Second})
		nw.nodes[m.Addr] = c
		cs = append(cs, c)
	}
	return cs, nw
}

func index(seed int) ([]byte, digest.Digest) {
	b := []byte(fmt.Sprintf(`{"schemaVersion":2,"mediaType":%q,"manifests":[],"annotations":{"seed":"%d"}}`, indexType, seed))
	return b, digest.FromBytes(b)
}

func ids(cs []*Cluster) []string {
	var out []string
	for _, c := range cs {
		out = append(out, c.opts.Self.ID)
	}
	return out
}

func byID(cs []*Cluster, id string) int {
	for i, c := range cs {
		if c.opts.Self.ID == id {
			return i
		}
	}
	return -1
}

// The registry sees one GET per manifest whichever way the nodes ask: in
// turn or all at once, the owner first or last.
func TestOneGetPerCluster(t *testing.T) {
	for _, tc := range []string{"in turn", "at once"} {
		t.Run(tc, func(t *testing.T) {
			b, d := index(1)
			reg := &registry{manifests: map[digest.Digest][]byte{d: b}}
			cs, _ := cluster(t, 5, reg)
			get := func(c *Cluster) error {
				m, src, err := c.Get(context.Background(), "reg.test", "team/app", d)
				if err != nil {
					return err
				}
				if !bytes.Equal(m.Content, b) || m.MediaType != indexType {
					return fmt.Errorf("%s got other content from %s", c.opts.Self.ID, src)
				}
				return nil
			}
			if tc == "in turn" {
				for _, c := range cs {
					if err := get(c); err != nil {
						t.Fatal(err)
					}
				}
			} else {
				reg.release = make(chan struct{})
				errs := make(chan error, len(cs))
				for _, c := range cs {
					go func() { errs <- get(c) }()
				}
				// Every node is waiting on the one GET the owner sent.
				for reg.gets.Load() == 0 {
					time.Sleep(time.Millisecond)
				}
				close(reg.release)
				for range cs {
					if err := <-errs; err != nil {
						t.Fatal(err)
					}
				}
			}
			if n := reg.gets.Load(); n != 1 {
				t.Fatalf("registry served %d GETs for %d nodes; want 1", n, len(cs))
			}
		})
	}
}

// A member that sends other bytes is not believed; the owner's copy is
// taken instead, or none.
func TestLyingMemberNotBelieved(t *testing.T) {
	b, d := index(2)
	reg := &registry{manifests: map[digest.Digest][]byte{d: b}}
	cs, nw := cluster(t, 3, reg)
	rank := owner.Rank(d.String(), ids(cs))
	own := cs[byID(cs, rank[0])]
	asker := cs[byID(cs, rank[2])]
	nw.lie[own.opts.Self.Addr] = true
	if _, _, err := asker.Get(context.Background(), "reg.test", "team/app", d); !errors.Is(err, ErrNotFound) {
		t.Fatalf("with only a lying owner: %v, want ErrNotFound", err)
	}
	if _, _, err := asker.opts.Store.GetManifest(d); err == nil {
		t.Fatal("the lie was stored")
	}
}

// An owner whose credentials the registry refuses sends the asking node to
// fetch it with its client's.
func TestOwnerRefusedFetchYourself(t *testing.T) {
	b, d := index(3)
	reg := &registry{manifests: map[digest.Digest][]byte{d: b}, refuse: true}
	cs, _ := cluster(t, 3, reg)
	rank := owner.Rank(d.String(), ids(cs))
	for _, id := range rank {
		if _, _, err := cs[byID(cs, id)].Get(context.Background(), "reg.test", "team/app", d); !errors.Is(err, ErrFetchYourself) {
			t.Errorf("%s: %v, want ErrFetchYourself", id, err)
		}
	}
}

// While the registry is down, a manifest the owner holds still comes from
// it; one nobody holds is not in the cluster.
func TestRegistryDown(t *testing.T) {
	b, d := index(4)
	b2, d2 := index(5)
	reg := &registry{manifests: map[digest.Digest][]byte{d: b, d2: b2}}
	cs, _ := cluster(t, 4, reg)
	if _, _, err := cs[0].Get(context.Background(), "reg.test", "team/app", d); err != nil {
		t.Fatal(err)
	}
	reg.down.Store(true)
	for _, c := range cs {
		if _, _, err := c.opts.Store.GetManifest(d); err == nil {
			continue // holds it already
		}
		if _, _, err := c.Get(context.Background(), "reg.test", "team/app", d); err != nil {
			t.Errorf("%s while the registry is down: %v", c.opts.Self.ID, err)
		}
	}
	if _, _, err := cs[1].Get(context.Background(), "reg.test", "team/app", d2); !errors.Is(err, ErrNotFound) {
		t.Errorf("a manifest nobody holds: %v, want ErrNotFound", err)
	}
}

// A tag resolved on one node is found on every other through the tag's
// owner; the latest resolution wins; records that do not check, from
// non-members, or for tags another member owns are refused.
func TestTags(t *testing.T) {
	reg := &registry{}
	cs, nw := cluster(t, 4, reg)
	nw.puts = make(chan *pb.TagRecord, 16)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for _, c := range cs {
		wg.Go(func() { c.Run(ctx) })
	}
	defer func() { cancel(); wg.Wait() }()

	_, d1 := index(10)
	_, d2 := index(11)
	key := tagKey("reg.test", "team/app", "v1")
	rank := owner.Rank(key, ids(cs))
	first := cs[byID(cs, rank[3])] // neither the owner nor the next
	t0 := time.Now().Add(-time.Minute)
	first.Record(Tag{Registry: "reg.test", Repo: "team/app", Tag: "v1", Digest: d1, MediaType: indexType, Size: 10, ResolvedAt: t0, Public: true})
	for range 2 { // the owner and the next in rank
		if rec := <-nw.puts; rec.GetDigest() != d1.String() {
			t.Fatalf("sent %v", rec)
		}
	}
	for _, c := range cs {
		got, err := c.Lookup(context.Background(), "reg.test", "team/app", "v1")
		if err != nil || got.Digest != d1 || !got.Public || got.Size != 10 {
			t.Fatalf("%s: %+v, %v", c.opts.Self.ID, got, err)
		}
	}
	// A later resolution on another node moves the tag everywhere.
	second := cs[byID(cs, rank[2])]
	second.Record(Tag{Registry: "reg.test", Repo: "team/app", Tag: "v1", Digest: d2, MediaType: indexType, Size: 11, ResolvedAt: t0.Add(time.Second)})
	<-nw.puts
	<-nw.puts
	if got, err := first.Lookup(context.Background(), "reg.test", "team/app", "v1"); err != nil || got.Digest != d2 {
		t.Fatalf("after the tag moved: %+v, %v", got, err)
	}
	if _, err := cs[0].Lookup(context.Background(), "reg.test", "team/app", "never"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("an unknown tag: %v", err)
	}

	own := cs[byID(cs, rank[0])]
	good := toProto(Tag{Registry: "reg.test", Repo: "team/app", Tag: "v1", Digest: d1, MediaType: indexType, Size: 1, ResolvedAt: time.Now()}, first.opts.Self.ID)
	for _, tc := range []struct {
		name string
		from string
		mut  func(*pb.TagRecord)
		want codes.Code
	}{
		{"not a member", "mallory", func(r *pb.TagRecord) { r.HostId = "mallory" }, codes.PermissionDenied},
		{"claims another id", first.opts.Self.ID, func(r *pb.TagRecord) { r.HostId = rank[1] }, codes.PermissionDenied},
		{"bad digest", first.opts.Self.ID, func(r *pb.TagRecord) { r.Digest = "sha256:zz" }, codes.InvalidArgument},
		{"not a manifest type", first.opts.Self.ID, func(r *pb.TagRecord) { r.MediaType = "text/html" }, codes.InvalidArgument},
		{"bad repository", first.opts.Self.ID, func(r *pb.TagRecord) { r.Repository = "../etc" }, codes.InvalidArgument},
		{"another's tag", first.opts.Self.ID, func(r *pb.TagRecord) { r.Tag = otherOwned(cs, own.opts.Self.ID) }, codes.FailedPrecondition},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := toProto(mustFrom(t, good), first.opts.Self.ID)
			tc.mut(rec)
			_, err := own.PutTag(context.WithValue(context.Background(), callerKey{}, tc.from), rec)
			if status.Code(err) != tc.want {
				t.Fatalf("PutTag: %v, want %s", err, tc.want)
			}
		})
	}
	// A record dated in the future is kept as of now, so it cannot stay the
	// latest for ever.
	future := toProto(mustFrom(t, good), first.opts.Self.ID)
	future.ResolvedAt = time.Now().Add(24 * time.Hour).UnixNano()
	if _, err := own.PutTag(context.WithValue(context.Background(), callerKey{}, first.opts.Self.ID), future); err != nil {
		t.Fatal(err)
	}
	if got, _ := own.tags.Get(key); got.ResolvedAt.After(time.Now()) {
		t.Fatalf("a future resolution kept as %v", got.ResolvedAt)
	}
}

func mustFrom(t *testing.T, r *pb.TagRecord) Tag {
	t.Helper()
	tg, err := fromProto(r)
	if err != nil {
		t.Fatal(err)
	}
	return tg
}

// otherOwned is a tag of team/app that id is not among the first three of.
func otherOwned(cs []*Cluster, id string) string {
	for i := 0; ; i++ {
		tag := fmt.Sprintf("t%d", i)
		r := owner.Rank(tagKey("reg.test", "team/app", tag), ids(cs))
		if r[0] != id && r[1] != id && r[2] != id {
			return tag
		}
	}
}
