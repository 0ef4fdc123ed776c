package swarm

import (
	"context"
	"crypto/sha256"
	"log/slog"
	"slices"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/p2p/owner"
	"github.com/registry-proxy/registry-proxy/p2p/pb"
)

// Holdings are the complete blobs this node holds (its store and its
// containerd's); *blobstore.Store is one.
type Holdings interface {
	Complete() map[digest.Digest]int64
	// Changed is closed at the next change of Complete.
	Changed() <-chan struct{}
}

// Announcing sends announcements to other nodes; *transfer.Pool is one.
type Announcing interface {
	Announce(ctx context.Context, addr string, req *pb.AnnounceRequest) error
}

// AnnouncerOptions configure an Announcer.
type AnnouncerOptions struct {
	Self      string
	Members   Members
	Holdings  Holdings
	Transport Announcing
	// Settle batches changes: an announcement goes out this long after
	// the first change it carries.
	Settle time.Duration
	// Poll is how often membership is compared with the last
	// announcement's; Refresh how often every owner is told again (an
	// owner that restarted lost what it was told).
	Poll, Refresh time.Duration
	Logger        *slog.Logger
}

// Announcer tells each digest's owner that this node holds the blob, so
// the owner hands this node out as a peer for it: blobs this node pulled,
// and blobs its containerd holds that never came through the mirror. Each
// owner gets the whole set of its digests this node holds, when that set
// changes (a blob added or removed, a member joined or left).
type Announcer struct {
	opts AnnouncerOptions
	log  *slog.Logger
	// sent is each owner's last announced set (a fingerprint).
	sent map[string][32]byte
}

// NewAnnouncer returns an announcer; Run sends.
func NewAnnouncer(opts AnnouncerOptions) *Announcer {
	if opts.Settle <= 0 {
		opts.Settle = time.Second
	}
	if opts.Poll <= 0 {
		opts.Poll = 5 * time.Second
	}
	if opts.Refresh <= 0 {
		opts.Refresh = 5 * time.Minute
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	return &Announcer{opts: opts, log: opts.Logger.With("component", "announce"), sent: map[string][32]byte{}}
}

// Run announces until ctx ends.
func (a *Announcer) Run(ctx context.Context) {
	poll := time.NewTicker(a.opts.Poll)
	defer poll.Stop()
	refresh := time.NewTicker(a.opts.Refresh)
	defer refresh.Stop()
	var members [32]byte
	first, ok := true, true
	for {
		changed := a.opts.Holdings.Changed()
		now, ids := a.members()
		if now != members || first || !ok {
			members, first = now, false
			ok = a.Announce(ctx, ids)
		}
		select {
		case <-ctx.Done():
			return
		case <-changed:
			select {
			case <-ctx.Done():
				return
			case <-time.After(a.opts.Settle):
			}
			ok = a.Announce(ctx, ids)
		case <-poll.C: // membership, or a send that failed
		case <-refresh.C:
			clear(a.sent)
			ok = a.Announce(ctx, ids)
		}
	}
}

// members returns the live members' peer addresses by id, and a
// fingerprint of them.
func (a *Announcer) members() ([32]byte, map[string]string) {
	ms := a.opts.Members.Members()
	ids := make(map[string]string, len(ms))
	keys := make([]string, 0, len(ms))
	for _, m := range ms {
		ids[m.ID] = m.Addr
		keys = append(keys, m.ID+"="+m.Addr)
	}
	return fingerprint(keys), ids
}

// fingerprint identifies a set of lines, whatever their order.
func fingerprint(lines []string) [32]byte {
	slices.Sort(lines)
	h := sha256.New()
	for _, l := range lines {
		h.Write([]byte(l + "\n"))
	}
	var sum [32]byte
	copy(sum[:], h.Sum(nil))
	return sum
}

// Announce sends each owner (members by id, with their addresses) the set
// of its digests this node holds, where it differs from the last sent. It
// reports whether every owner was told.
func (a *Announcer) Announce(ctx context.Context, members map[string]string) bool {
	ok := true
	ids := make([]string, 0, len(members))
	for id := range members {
		ids = append(ids, id)
	}
	byOwner := map[string][]*pb.HeldBlob{}
	for d, size := range a.opts.Holdings.Complete() {
		if o := owner.Of(d.String(), ids); o != "" && o != a.opts.Self {
			byOwner[o] = append(byOwner[o], &pb.HeldBlob{Digest: d.String(), Size: size})
		}
	}
	for id := range a.sent {
		if _, ok := members[id]; !ok {
			delete(a.sent, id)
		}
	}
	for id, addr := range members {
		if id == a.opts.Self {
			continue
		}
		blobs := byOwner[id]
		slices.SortFunc(blobs, func(x, y *pb.HeldBlob) int { return strings.Compare(x.Digest, y.Digest) })
		digests := make([]string, len(blobs))
		for i, b := range blobs {
			digests[i] = b.Digest
		}
		fp := fingerprint(digests)
		last, told := a.sent[id]
		if (told && last == fp) || (!told && len(blobs) == 0) {
			continue
		}
		actx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err := a.opts.Transport.Announce(actx, addr, &pb.AnnounceRequest{HostId: a.opts.Self, Blobs: blobs})
		cancel()
		if err != nil {
			if ctx.Err() == nil {
				a.log.Debug("announcing held blobs", "owner", id, "blobs", len(blobs), "err", err)
			}
			ok = false // told again at the next poll
			continue
		}
		a.sent[id] = fp
		a.log.Debug("held blobs announced", "owner", id, "blobs", len(blobs))
	}
	return ok
}
