// Package manifests carries manifests and tag resolutions through the
// cluster. A manifest by digest is fetched from the registry by the digest's
// owner alone, with its own credentials, and every other node takes it from
// the owner or a member holding it, checked against its digest: the registry
// (which meters manifest GETs) sees one GET per manifest per cluster. Every
// tag resolution a node makes is kept on that node and at the tag's owner,
// so that while the registry cannot answer, a tag still resolves to what the
// cluster last saw.
package manifests

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sync/singleflight"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/registry-proxy/registry-proxy/manifest"
	"github.com/registry-proxy/registry-proxy/p2p/membership"
	"github.com/registry-proxy/registry-proxy/p2p/owner"
	"github.com/registry-proxy/registry-proxy/p2p/pb"
	"github.com/registry-proxy/registry-proxy/proxy/upstream"
)

var (
	// ErrFetchYourself means the registry refused the owner's credentials:
	// the asking node fetches the manifest with its client's.
	ErrFetchYourself = errors.New("manifests: the owner cannot read it")
	// ErrNotFound means no member answered with the manifest or tag.
	ErrNotFound = errors.New("manifests: not in the cluster")
)

// Store is this node's manifests; *blobstore.Store is one.
type Store interface {
	GetManifest(d digest.Digest) (mediaType string, content []byte, err error)
	PutManifest(d digest.Digest, mediaType string, content []byte) error
}

// Upstream is the registry as this node's own credentials reach it; the
// upstream client WithNodeCredentials is one.
type Upstream interface {
	Manifest(ctx context.Context, method, registry, repo, ref string, hdr http.Header) (*http.Response, error)
}

// Members lists the live members, this node included; nil: a node alone.
type Members interface {
	Members() []membership.Member
}

// Authenticator names the member that made a peer call (its certificate
// and the address gossip knows for it); *swarm.Server is one.
type Authenticator interface {
	Caller(ctx context.Context, claimed string) (membership.Member, error)
}

// RegistryChecker refuses a registry or repository a peer names that this
// node may not fetch; the upstream client is one.
type RegistryChecker interface {
	CheckRepository(registry, repo string) error
}

// Transport makes the peer calls; *transfer.Pool is one.
type Transport interface {
	GetManifest(ctx context.Context, addr string, req *pb.GetManifestRequest) (*pb.Manifest, error)
	PutTag(ctx context.Context, addr string, rec *pb.TagRecord) error
	GetTag(ctx context.Context, addr string, req *pb.TagRequest) (*pb.TagRecord, error)
}

// Sharing tells whether a manifest may go to peers, asking the registry
// with no credentials when it does not know; *sharing.Policy is one.
type Sharing interface {
	LearnManifest(ctx context.Context, registry, repo string, d digest.Digest) bool
}

// Tag is one resolution of a tag by the registry.
type Tag struct {
	Registry, Repo, Tag string
	Digest              digest.Digest
	MediaType           string
	// Size is the manifest's length, -1 when the registry did not say.
	Size int64
	// ResolvedAt is when the registry answered.
	ResolvedAt time.Time
	// Public: the registry answered it for no credentials at all.
	Public bool
}

// Options configure a Cluster.
type Options struct {
	Self membership.Member
	// Members, Auth and Transport reach the other members; any nil: this
	// node alone, which keeps its own tag resolutions only.
	Members   Members
	Auth      Authenticator
	Transport Transport
	Store     Store
	// Upstream fetches with this node's own credentials, as the owner.
	Upstream Upstream
	// Sharing keeps private manifests from peers (p2p.share_private =
	// false); nil shares everything.
	Sharing    Sharing
	Registries RegistryChecker
	// MaxSize bounds a manifest (upstream.max_manifest_size).
	MaxSize int64
	// Timeout bounds one peer call; UpstreamTimeout one registry request.
	Timeout, UpstreamTimeout time.Duration
	// Tags bounds the tag resolutions held.
	Tags int
	// Now is the clock; time.Now when nil.
	Now    func() time.Time
	Logger *slog.Logger
}

// Cluster is this node's side of the Manifests service and the client of
// the others'.
type Cluster struct {
	pb.UnimplementedManifestsServer
	opts    Options
	log     *slog.Logger
	flights singleflight.Group
	tags    *lru.Cache[string, Tag]
	// sent remembers what was last told to a tag's owner, so a tag resolved
	// on every node of a rollout is sent once, not once a node.
	sent *lru.Cache[string, Tag]
	out  chan Tag
}

// asks bounds the members asked for a manifest or a tag: the owner and the
// next in rank, who take over when it leaves and may hold it.
const asks = 3

// resend is how often an unchanged tag resolution is told to its owner
// again, so an owner that restarted learns it back.
const resend = 10 * time.Minute

// New returns a cluster; Run sends tag resolutions to their owners.
func New(opts Options) *Cluster {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Timeout <= 0 {
		opts.Timeout = 5 * time.Second
	}
	if opts.UpstreamTimeout <= 0 {
		opts.UpstreamTimeout = time.Minute
	}
	if opts.MaxSize <= 0 {
		opts.MaxSize = 4 << 20
	}
	if opts.Tags <= 0 {
		opts.Tags = 16384
	}
	tags, _ := lru.New[string, Tag](opts.Tags)
	sent, _ := lru.New[string, Tag](opts.Tags)
	return &Cluster{opts: opts, log: opts.Logger.With("component", "manifests"), tags: tags, sent: sent, out: make(chan Tag, 1024)}
}

func (c *Cluster) alone() bool {
	return c.opts.Members == nil || c.opts.Transport == nil || c.opts.Auth == nil
}

// rank is the live members in rendezvous order for key.
func (c *Cluster) rank(key string) []membership.Member {
	ms := c.opts.Members.Members()
	byID := make(map[string]membership.Member, len(ms))
	ids := make([]string, 0, len(ms))
	for _, m := range ms {
		byID[m.ID] = m
		ids = append(ids, m.ID)
	}
	var out []membership.Member
	for _, id := range owner.Rank(key, ids) {
		out = append(out, byID[id])
	}
	return out
}

// Get returns manifest d of repo from the cluster: a member holding it, or
// the owner, which fetches it from the registry with its own credentials
// (this node, when it is the owner). The manifest is checked against d.
// Source is "peer" or "upstream".
func (c *Cluster) Get(ctx context.Context, registry, repo string, d digest.Digest) (manifest.Manifest, string, error) {
	if c.alone() {
		return manifest.Manifest{}, "", ErrNotFound
	}
	type result struct {
		m      manifest.Manifest
		source string
	}
	v, err, _ := c.flights.Do("get "+d.String(), func() (any, error) {
		// Shared by every client of this node asking at once: one leaving
		// does not fail the others. Each call below has its own bound.
		ctx := context.WithoutCancel(ctx)
		var errs []error
		yourself := false
		for i, m := range c.rank(d.String()) {
			if i == asks {
				break
			}
			if m.ID == c.opts.Self.ID {
				if i > 0 {
					continue // the store was looked at before Get
				}
				got, err := c.fetch(ctx, registry, repo, d)
				if err == nil {
					return result{got, "upstream"}, nil
				}
				var se *upstream.StatusError
				if errors.As(err, &se) && refusal(se.Code) {
					yourself = true
				}
				errs = append(errs, fmt.Errorf("as owner: %w", err))
				continue
			}
			pctx, cancel := context.WithTimeout(ctx, c.opts.Timeout)
			resp, err := c.opts.Transport.GetManifest(pctx, m.Addr, &pb.GetManifestRequest{Registry: registry, Repository: repo, Digest: d.String(), HostId: c.opts.Self.ID})
			cancel()
			switch status.Code(err) {
			case codes.OK:
				got, err := manifest.Check(d, resp.GetMediaType(), resp.GetContent(), c.opts.MaxSize)
				if err != nil {
					c.log.Warn("a member sent a manifest that does not check; not taken", "member", m.ID, "digest", d, "err", err)
					errs = append(errs, fmt.Errorf("%s: %w", m.ID, err))
					continue
				}
				if err := c.opts.Store.PutManifest(d, got.MediaType, got.Content); err != nil {
					c.log.Warn("caching manifest", "digest", d, "err", err)
				}
				return result{got, "peer"}, nil
			case codes.PermissionDenied:
				yourself = true
			}
			errs = append(errs, fmt.Errorf("%s: %w", m.ID, err))
		}
		if yourself {
			return nil, errors.Join(append([]error{ErrFetchYourself}, errs...)...)
		}
		return nil, errors.Join(append([]error{ErrNotFound}, errs...)...)
	})
	if err != nil {
		return manifest.Manifest{}, "", err
	}
	r := v.(result)
	return r.m, r.source, nil
}

func refusal(code int) bool {
	return code == http.StatusUnauthorized || code == http.StatusForbidden || code == http.StatusNotFound
}

// fetch is the owner's GET of a manifest by digest, with this node's own
// credentials, one at a time per digest, kept in the store.
func (c *Cluster) fetch(ctx context.Context, registry, repo string, d digest.Digest) (manifest.Manifest, error) {
	v, err, _ := c.flights.Do("fetch "+d.String(), func() (any, error) {
		if mt, content, err := c.opts.Store.GetManifest(d); err == nil {
			return manifest.Manifest{Digest: d, MediaType: mt, Content: content}, nil
		}
		// Shared by every node asking at once.
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.opts.UpstreamTimeout)
		defer cancel()
		resp, err := c.opts.Upstream.Manifest(ctx, http.MethodGet, registry, repo, d.String(), http.Header{"Accept": []string{manifest.Accept}})
		if err != nil {
			return nil, err
		}
		defer resp.Body.Close()
		m, err := manifest.Read(resp, d, c.opts.MaxSize)
		if err != nil {
			return nil, err
		}
		if err := c.opts.Store.PutManifest(d, m.MediaType, m.Content); err != nil {
			c.log.Warn("caching manifest", "digest", d, "err", err)
		}
		c.log.Debug("manifest fetched for the cluster", "registry", registry, "repo", repo, "digest", d)
		return m, nil
	})
	if err != nil {
		return manifest.Manifest{}, err
	}
	return v.(manifest.Manifest), nil
}

func tagKey(registry, repo, tag string) string { return registry + "/" + repo + ":" + tag }

// Record keeps a tag resolution the registry just made, and has it sent to
// the tag's owner.
func (c *Cluster) Record(t Tag) {
	k := tagKey(t.Registry, t.Repo, t.Tag)
	c.keep(k, t)
	if c.alone() {
		return
	}
	if last, ok := c.sent.Get(k); ok && last.Digest == t.Digest && last.Public == t.Public && t.ResolvedAt.Sub(last.ResolvedAt) < resend {
		return
	}
	c.sent.Add(k, t)
	select {
	case c.out <- t:
	default:
		c.log.Debug("tag resolutions queue full; not sent to the owner", "tag", k)
	}
}

// keep holds t unless a later resolution of the tag is held.
func (c *Cluster) keep(k string, t Tag) {
	if held, ok := c.tags.Peek(k); ok && held.ResolvedAt.After(t.ResolvedAt) {
		return
	}
	c.tags.Add(k, t)
}

// Run sends the recorded tag resolutions to their owners until ctx ends.
func (c *Cluster) Run(ctx context.Context) {
	if c.alone() {
		return
	}
	for {
		select {
		case <-ctx.Done():
			return
		case t := <-c.out:
			k := tagKey(t.Registry, t.Repo, t.Tag)
			for i, m := range c.rank(k) {
				if i == 2 {
					break // the owner and the next in rank, who takes over
				}
				if m.ID == c.opts.Self.ID {
					continue
				}
				pctx, cancel := context.WithTimeout(ctx, c.opts.Timeout)
				err := c.opts.Transport.PutTag(pctx, m.Addr, toProto(t, c.opts.Self.ID))
				cancel()
				if err != nil && ctx.Err() == nil {
					c.log.Debug("telling a tag's owner its resolution", "owner", m.ID, "tag", k, "err", err)
				}
			}
		}
	}
}

// Lookup returns the latest resolution of a tag this node or the tag's
// owner holds.
func (c *Cluster) Lookup(ctx context.Context, registry, repo, tag string) (Tag, error) {
	k := tagKey(registry, repo, tag)
	best, found := c.tags.Get(k)
	if !c.alone() {
		for i, m := range c.rank(k) {
			if i == 2 {
				break
			}
			if m.ID == c.opts.Self.ID {
				continue
			}
			pctx, cancel := context.WithTimeout(ctx, c.opts.Timeout)
			rec, err := c.opts.Transport.GetTag(pctx, m.Addr, &pb.TagRequest{Registry: registry, Repository: repo, Tag: tag, HostId: c.opts.Self.ID})
			cancel()
			if err != nil {
				continue
			}
			t, err := fromProto(rec)
			if err != nil || t.Registry != registry || t.Repo != repo || t.Tag != tag {
				c.log.Warn("a member answered a tag with a record that does not check", "member", m.ID, "tag", k, "err", err)
				continue
			}
			if !found || t.ResolvedAt.After(best.ResolvedAt) {
				best, found = t, true
			}
		}
	}
	if !found {
		return Tag{}, ErrNotFound
	}
	c.keep(k, best)
	return best, nil
}

func toProto(t Tag, self string) *pb.TagRecord {
	return &pb.TagRecord{Registry: t.Registry, Repository: t.Repo, Tag: t.Tag, Digest: t.Digest.String(), MediaType: t.MediaType,
		Size: t.Size, ResolvedAt: t.ResolvedAt.UnixNano(), Public: t.Public, HostId: self}
}

// fromProto checks a record a peer sent: a digest, a manifest's media type,
// a size within bounds, a time.
func fromProto(r *pb.TagRecord) (Tag, error) {
	d, err := digest.Parse(r.GetDigest())
	if err != nil {
		return Tag{}, fmt.Errorf("digest: %w", err)
	}
	if !manifest.MediaTypeOK(r.GetMediaType()) {
		return Tag{}, fmt.Errorf("media type %q is not a manifest's", r.GetMediaType())
	}
	if r.GetSize() < -1 || r.GetResolvedAt() <= 0 || r.GetRegistry() == "" || r.GetTag() == "" || !upstream.ValidRepository(r.GetRepository()) {
		return Tag{}, errors.New("incomplete record")
	}
	return Tag{Registry: r.GetRegistry(), Repo: r.GetRepository(), Tag: r.GetTag(), Digest: d, MediaType: r.GetMediaType(),
		Size: r.GetSize(), ResolvedAt: time.Unix(0, r.GetResolvedAt()), Public: r.GetPublic()}, nil
}

// GetManifest implements pb.ManifestsServer.
func (c *Cluster) GetManifest(ctx context.Context, req *pb.GetManifestRequest) (*pb.Manifest, error) {
	if _, err := c.opts.Auth.Caller(ctx, req.GetHostId()); err != nil {
		return nil, err
	}
	d, err := digest.Parse(req.GetDigest())
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "digest: %v", err)
	}
	if c.opts.Registries != nil {
		if err := c.opts.Registries.CheckRepository(req.GetRegistry(), req.GetRepository()); err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "%v", err)
		}
	}
	if c.opts.Sharing != nil && !c.opts.Sharing.LearnManifest(ctx, req.GetRegistry(), req.GetRepository(), d) {
		return nil, status.Error(codes.PermissionDenied, "private content is not shared with peers (p2p.share_private = false)")
	}
	if mt, content, err := c.opts.Store.GetManifest(d); err == nil {
		return &pb.Manifest{MediaType: mt, Content: content}, nil
	}
	if r := c.rank(d.String()); len(r) == 0 || r[0].ID != c.opts.Self.ID {
		return nil, status.Error(codes.NotFound, "not held here, and another member owns it")
	}
	m, err := c.fetch(ctx, req.GetRegistry(), req.GetRepository(), d)
	var se *upstream.StatusError
	switch {
	case err == nil:
		return &pb.Manifest{MediaType: m.MediaType, Content: m.Content}, nil
	case errors.As(err, &se) && refusal(se.Code):
		return nil, status.Errorf(codes.PermissionDenied, "the registry refused this node's credentials: %d", se.Code)
	case upstream.Unreachable(err):
		return nil, status.Errorf(codes.Unavailable, "the registry did not answer: %v", err)
	case errors.Is(err, manifest.ErrInvalid):
		c.log.Error("registry sent an invalid manifest", "registry", req.GetRegistry(), "repo", req.GetRepository(), "digest", d, "err", err)
		return nil, status.Errorf(codes.DataLoss, "%v", err)
	default:
		return nil, status.Errorf(codes.Unavailable, "%v", err)
	}
}

// PutTag implements pb.ManifestsServer: a member's resolution of a tag
// this node owns or is next in rank for.
func (c *Cluster) PutTag(ctx context.Context, rec *pb.TagRecord) (*pb.PutTagResponse, error) {
	if _, err := c.opts.Auth.Caller(ctx, rec.GetHostId()); err != nil {
		return nil, err
	}
	t, err := fromProto(rec)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "tag record: %v", err)
	}
	if now := c.opts.Now(); t.ResolvedAt.After(now) {
		t.ResolvedAt = now // a clock ahead would keep its record first for ever
	}
	k := tagKey(t.Registry, t.Repo, t.Tag)
	owned := false
	for i, m := range c.rank(k) {
		owned = owned || (i < asks && m.ID == c.opts.Self.ID)
	}
	if !owned {
		return nil, status.Error(codes.FailedPrecondition, "not this tag's owner")
	}
	c.keep(k, t)
	return &pb.PutTagResponse{}, nil
}

// GetTag implements pb.ManifestsServer.
func (c *Cluster) GetTag(ctx context.Context, req *pb.TagRequest) (*pb.TagRecord, error) {
	if _, err := c.opts.Auth.Caller(ctx, req.GetHostId()); err != nil {
		return nil, err
	}
	t, ok := c.tags.Get(tagKey(req.GetRegistry(), req.GetRepository(), req.GetTag()))
	if !ok {
		return nil, status.Error(codes.NotFound, "no resolution of this tag here")
	}
	return toProto(t, c.opts.Self.ID), nil
}
