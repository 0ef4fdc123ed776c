package swarm

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/opencontainers/go-digest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/registry-proxy/registry-proxy/blobstore"
	"github.com/registry-proxy/registry-proxy/p2p/collector"
	"github.com/registry-proxy/registry-proxy/p2p/membership"
	"github.com/registry-proxy/registry-proxy/p2p/pb"
	"github.com/registry-proxy/registry-proxy/piece"
	"github.com/registry-proxy/registry-proxy/proxy/upstream"
	"github.com/registry-proxy/registry-proxy/task"
)

const testDigest = "sha256:2222222222222222222222222222222222222222222222222222222222222222"

// staticMembers is a fixed membership.
type staticMembers []membership.Member

func (m staticMembers) Members() []membership.Member { return m }

func newRegisterSwarm(t testing.TB) *Server {
	t.Helper()
	store, err := blobstore.Open(context.Background(), t.TempDir(), blobstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	up, err := upstream.New(upstream.Options{Registries: map[string]string{"reg.test": "http://127.0.0.1:9"}, Allow: []string{"docker.io"}})
	if err != nil {
		t.Fatal(err)
	}
	members := staticMembers{{ID: "owner", Addr: "127.0.0.1:7000"}, {ID: "child", Addr: "127.0.0.2:7000"}}
	return NewServer(ServerOptions{
		Members:    members,
		Store:      store,
		Registries: up,
	})
}

// from is a gRPC context of a request from ip (an insecure peer port: the
// id is the one claimed).
func from(ip string) context.Context {
	return peer.NewContext(context.Background(), &peer.Peer{Addr: &net.TCPAddr{IP: net.ParseIP(ip), Port: 40000}})
}

func TestRegisterValidates(t *testing.T) {
	s := newRegisterSwarm(t)
	ok := func() *pb.RegisterRequest {
		return &pb.RegisterRequest{Digest: testDigest, HostId: "child", Addr: "127.0.0.2:7000", Registry: "reg.test", Repository: "team/app"}
	}
	tests := []struct {
		name string
		ip   string
		mut  func(*pb.RegisterRequest)
		code codes.Code
	}{
		{"valid", "127.0.0.2", func(*pb.RegisterRequest) {}, codes.OK},
		{"bad digest", "127.0.0.2", func(r *pb.RegisterRequest) { r.Digest = "sha256:zz" }, codes.InvalidArgument},
		{"not a member", "127.0.0.2", func(r *pb.RegisterRequest) { r.HostId = "intruder" }, codes.PermissionDenied},
		{"member from another address", "127.0.0.9", func(*pb.RegisterRequest) {}, codes.PermissionDenied},
		{"registry not allowed", "127.0.0.2", func(r *pb.RegisterRequest) { r.Registry = "169.254.169.254" }, codes.InvalidArgument},
		{"repository leaving /v2/", "127.0.0.2", func(r *pb.RegisterRequest) { r.Repository = "../../admin" }, codes.InvalidArgument},
		{"repository upper case", "127.0.0.2", func(r *pb.RegisterRequest) { r.Repository = "Team/App" }, codes.InvalidArgument},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req := ok()
			tt.mut(req)
			_, err := s.Register(from(tt.ip), req)
			if got := status.Code(err); got != tt.code {
				t.Fatalf("Register = %v, want %v", err, tt.code)
			}
		})
	}
	// The registered address is the member's, not the one claimed.
	req := ok()
	req.Addr = "203.0.113.7:7000"
	if _, err := s.Register(from("127.0.0.2"), req); err != nil {
		t.Fatal(err)
	}
	for _, p := range s.opts.Tracker.Peers(testDigest, "", 10) {
		if p.Addr != "127.0.0.2:7000" {
			t.Errorf("tracker hands out %s for %s, a claimed address", p.Addr, p.ID)
		}
	}
}

func FuzzRegister(f *testing.F) {
	s := newRegisterSwarm(f)
	f.Add(testDigest, "child", "127.0.0.2:7000", "reg.test", "team/app", "127.0.0.2")
	f.Add("sha256:", "", "", "", "../x", "::1")
	f.Fuzz(func(t *testing.T, d, host, addr, registry, repo, ip string) {
		resp, err := s.Register(from(ip), &pb.RegisterRequest{Digest: d, HostId: host, Addr: addr, Registry: registry, Repository: repo})
		if err != nil {
			return
		}
		if !upstream.ValidRepository(repo) || (registry != "reg.test" && registry != "docker.io") {
			t.Fatalf("accepted registry %q repository %q", registry, repo)
		}
		if host != "child" && host != "owner" {
			t.Fatalf("accepted host %q", host)
		}
		for _, p := range resp.GetPeers() {
			if strings.Contains(p.GetAddr(), "203.0.113") {
				t.Fatal("handed out a claimed address")
			}
		}
	})
}

// Any bytes a parent sends as a PieceUpdate: refused, or an announcement
// within the plan that the collector takes without trouble.
func FuzzPieceUpdate(f *testing.F) {
	d := digest.Digest(testDigest)
	plan := piece.PlanFor(10 << 20) // 3 pieces
	ok, _ := proto.Marshal(&pb.PieceUpdate{Digest: testDigest, Size: plan.Size, PieceSize: plan.PieceSize,
		Pieces: []*pb.Piece{{Index: 0, Checksum: 7}, {Index: 2}}, Fetching: []uint32{1}})
	f.Add(ok)
	// Complete, but piece 0 twice for piece 1: refused.
	dup, _ := proto.Marshal(&pb.PieceUpdate{Digest: testDigest, Size: plan.Size, PieceSize: plan.PieceSize, Complete: true,
		Pieces: []*pb.Piece{{Index: 0}, {Index: 0}, {Index: 2}}})
	f.Add(dup)
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		var up pb.PieceUpdate
		if proto.Unmarshal(b, &up) != nil {
			return
		}
		a, err := parseUpdate(&up, d, plan)
		if err != nil {
			return
		}
		covered := map[int]bool{}
		for _, h := range a.has {
			if h.Index < 0 || h.Index >= plan.Count() {
				t.Fatalf("piece %d accepted of %d", h.Index, plan.Count())
			}
			covered[h.Index] = true
		}
		if a.complete && len(covered) != plan.Count() {
			t.Fatalf("complete accepted with %d of %d pieces", len(covered), plan.Count())
		}
		run := collector.New(collector.Options{}).NewRun(fakeJob{plan})
		run.AddParent(fakeParent("p"))
		run.Announce("p", a.has, a.fetching)
	})
}

type fakeJob struct{ plan piece.Plan }

func (j fakeJob) Digest() digest.Digest { return testDigest }
func (j fakeJob) Plan() piece.Plan      { return j.plan }
func (fakeJob) Has(int) bool            { return false }
func (fakeJob) Next() int               { return -1 }
func (fakeJob) Put(int, io.Reader, string, collector.Expect) error {
	return errors.New("not in this test")
}

type fakeParent string

func (p fakeParent) ID() string { return string(p) }
func (fakeParent) Fetch(context.Context, int, int64, int64) (io.ReadCloser, error) {
	return nil, errors.New("not in this test")
}

// fakeOwner answers registrations as the owner's task manager would.
type fakeOwner struct {
	err    error
	calls  int
	pieces int // of the blob, none held; 1 when 0
}

func (o *fakeOwner) OpenForPeers(context.Context, task.Request) (Owned, error) {
	o.calls++
	if o.err != nil {
		return nil, o.err
	}
	return fakeOwned{n: max(o.pieces, 1)}, nil
}

type fakeOwned struct{ n int }

func (fakeOwned) Size() int64                  { return 42 }
func (o fakeOwned) Pieces() ([]bool, []uint32) { return make([]bool, o.n), make([]uint32, o.n) }

// equalUploads: every other member uploads as fast as the owner ("owner",
// whose own state it does not stream to itself).
type equalUploads struct{}

func (equalUploads) OwnUpload() float64 { return 100e6 }
func (equalUploads) UploadOf(id string) float64 {
	if id == "owner" {
		return 0
	}
	return 100e6
}

// An owner that cannot fetch a blob with its own credentials has the
// registering nodes fetch it themselves for privateFor, then tries again.
func TestRegisterPrivate(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := newRegisterSwarm(t)
		o := &fakeOwner{err: &upstream.StatusError{Code: http.StatusUnauthorized}}
		s.opts.Owner = o
		req := &pb.RegisterRequest{Digest: testDigest, HostId: "child", Addr: "127.0.0.2:7000", Registry: "reg.test", Repository: "team/app"}
		for _, step := range []struct {
			after    time.Duration
			fix      bool // the owner's credentials now work
			yourself bool
			calls    int
		}{
			{0, false, true, 1},              // the owner tried, and could not
			{privateFor / 2, true, true, 1},  // remembered: not asked again
			{privateFor / 2, true, false, 2}, // past privateFor: the owner fetches it
			{privateFor / 2, true, false, 3}, // a running download is opened again
		} {
			time.Sleep(step.after)
			if step.fix {
				o.err = nil
			}
			resp, err := s.Register(from("127.0.0.2"), req)
			if err != nil {
				t.Fatal(err)
			}
			if resp.GetFetchYourself() != step.yourself || o.calls != step.calls {
				t.Fatalf("after %v: fetch yourself %v, owner asked %d times; want %v, %d", step.after, resp.GetFetchYourself(), o.calls, step.yourself, step.calls)
			}
			if !step.yourself && resp.GetSize() != 42 {
				t.Fatalf("size %d, want the owner's download's", resp.GetSize())
			}
		}
	})
}

// Each registration's answer names the upstream readers that claimed a
// share, the registering node aside: a node follows them whatever else it
// follows.
func TestRegisterNamesReaders(t *testing.T) {
	s := newRegisterSwarm(t)
	s.opts.Members = staticMembers{{ID: "owner", Addr: "127.0.0.1:7000"}, {ID: "child", Addr: "127.0.0.2:7000"}, {ID: "reader", Addr: "127.0.0.3:7000"}}
	s.opts.Owner = &fakeOwner{pieces: 12}
	s.opts.Delegations = &Delegations{Readers: 3}
	s.opts.Uploads = equalUploads{}
	s.opts.Downloads = &fakeDownloads{}
	register := func(id, ip string) *pb.RegisterResponse {
		t.Helper()
		resp, err := s.Register(from(ip), &pb.RegisterRequest{Digest: testDigest, HostId: id, Addr: ip + ":7000", Registry: "reg.test", Repository: "team/app"})
		if err != nil {
			t.Fatal(err)
		}
		return resp
	}
	ids := func(refs []*pb.PeerRef) (out []string) {
		for _, r := range refs {
			out = append(out, r.GetId()+"@"+r.GetAddr())
		}
		return out
	}
	first := register("child", "127.0.0.2")
	if len(first.GetUpstreamPieces()) == 0 {
		t.Fatal("the first reader to register got no share; the test needs one")
	}
	if got := ids(first.GetReaders()); len(got) != 0 {
		t.Errorf("the first reader was named readers %v, want none (itself aside, none has claimed)", got)
	}
	if got, want := ids(register("reader", "127.0.0.3").GetReaders()), []string{"child@127.0.0.2:7000"}; !slices.Equal(got, want) {
		t.Errorf("the second reader was named %v, want %v", got, want)
	}
	if got, want := ids(register("child", "127.0.0.2").GetReaders()), []string{"reader@127.0.0.3:7000"}; !slices.Equal(got, want) {
		t.Errorf("the first reader, again, was named %v, want %v", got, want)
	}
}
