package node

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/registry-proxy/registry-proxy/blobstore"
	"github.com/registry-proxy/registry-proxy/config"
	"github.com/registry-proxy/registry-proxy/inspect"
	"github.com/registry-proxy/registry-proxy/metrics"
	"github.com/registry-proxy/registry-proxy/p2p/collector"
	"github.com/registry-proxy/registry-proxy/p2p/hoststate"
	"github.com/registry-proxy/registry-proxy/p2p/manifests"
	"github.com/registry-proxy/registry-proxy/p2p/membership"
	"github.com/registry-proxy/registry-proxy/p2p/owner"
	"github.com/registry-proxy/registry-proxy/p2p/pb"
	"github.com/registry-proxy/registry-proxy/p2p/peer"
	"github.com/registry-proxy/registry-proxy/p2p/seeding"
	"github.com/registry-proxy/registry-proxy/p2p/sharing"
	"github.com/registry-proxy/registry-proxy/p2p/statesync"
	"github.com/registry-proxy/registry-proxy/p2p/swarm"
	"github.com/registry-proxy/registry-proxy/p2p/tracker"
	"github.com/registry-proxy/registry-proxy/p2p/transfer"
	"github.com/registry-proxy/registry-proxy/p2p/trust"
	"github.com/registry-proxy/registry-proxy/preheat"
	"github.com/registry-proxy/registry-proxy/proxy/access"
	"github.com/registry-proxy/registry-proxy/proxy/upstream"
	"github.com/registry-proxy/registry-proxy/task"
)

// peers is the P2P side of a node.
type peers struct {
	self      membership.Member
	members   *membership.Membership
	pool      *transfer.Pool
	syncer    *statesync.Syncer
	meter     *hoststate.Meter
	server    *peer.Server
	manifests *manifests.Cluster
	// owners are the members that rank as owners: live, and whose peer
	// port answered this node.
	owners    swarm.AnsweringMembers
	cancel    context.CancelFunc
	wg        sync.WaitGroup
	closeOnce sync.Once
}

func startPeers(ctx context.Context, cfg config.Config, store *blobstore.Store, up, peerUp *upstream.Client, checker *access.Checker,
	collOpts collector.Options, taskOpts task.Options, m *metrics.Metrics, log *slog.Logger) (*peers, *task.Manager, error) {
	id := cfg.P2P.NodeID
	if id == "" {
		h, err := os.Hostname()
		if err != nil {
			return nil, nil, fmt.Errorf("p2p: node id: %w", err)
		}
		id = h
	}
	ln, err := net.Listen("tcp", cfg.P2P.PeerListen)
	if err != nil {
		return nil, nil, fmt.Errorf("p2p: listen %s: %w", cfg.P2P.PeerListen, err)
	}
	addr := cfg.P2P.Advertise
	if addr == "" {
		addr = ln.Addr().String()
		if host, _, _ := net.SplitHostPort(addr); net.ParseIP(host).IsUnspecified() {
			ln.Close()
			return nil, nil, fmt.Errorf("p2p: peer_listen %s is a wildcard: set advertise to the address peers reach", cfg.P2P.PeerListen)
		}
	}
	ident, gossipKeys, err := peerIdentity(cfg.P2P, id, log)
	if err != nil {
		ln.Close()
		return nil, nil, fmt.Errorf("p2p: %w", err)
	}
	var p *peers
	// A node dialled at a member's address must present that member's
	// certificate; piece requests name this node (p2p.insecure).
	poolOpts := transfer.Options{NodeID: id, MemberAt: func(addr string) string { return p.members.At(addr) }}
	var serverTLS *tls.Config
	if ident != nil {
		poolOpts.TLS = ident.ClientConfig()
		serverTLS = ident.ServerConfig()
	}
	p = &peers{self: membership.Member{ID: id, Addr: addr}, pool: transfer.NewPool(poolOpts)}
	bg, cancel := context.WithCancel(context.Background())
	p.cancel = cancel

	meter := hoststate.New(hoststate.Options{
		Counters:    hoststate.SysCounters{Iface: cfg.Upload.Interface, DataDir: cfg.DataDir},
		MaxTxBps:    uint64(cfg.Upload.MaxTx),
		MaxRxBps:    uint64(cfg.Upload.MaxRx),
		UploadLimit: cfg.Upload.Limit,
		UploadRate:  uint64(cfg.Upload.Rate),
		Download:    collOpts.Download,
	})
	p.meter = meter
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		var warned bool
		meter.Run(bg, time.Second, func(err error) {
			if !warned {
				log.Warn("host state: some counters unreadable", "err", err)
				warned = true
			}
		})
	}()

	if cfg.Upload.Syncer.Enable {
		p.syncer = statesync.NewSyncer(statesync.SyncerOptions{
			HostID: id, Dial: p.pool.HostSyncDial, Interval: cfg.Upload.Syncer.Interval,
			Capacity: cfg.Upload.Syncer.Capacity, Logger: log,
		})
		collOpts.State = func(parent string) (*pb.HostState, bool) {
			st, _, ok := p.syncer.State(parent)
			return st, ok
		}
		m.GaugeFunc("statesync_parents", "Parents whose host state this node follows over SyncHost.", func() float64 { return float64(p.syncer.Following()) })
		m.ParentWeights(func() map[string]float64 {
			w := map[string]float64{}
			for _, id := range p.syncer.Parents() {
				st, _, ok := p.syncer.State(id)
				w[id] = collector.Weight(st, ok)
			}
			return w
		})
	}
	if p.members, err = membership.Start(ctx, membership.Options{NodeID: id, PeerAddr: addr, Join: cfg.P2P.Join, Keys: gossipKeys, Logger: log}); err != nil {
		ln.Close()
		p.close()
		return nil, nil, err
	}
	// Probe members' peer ports as they appear: downloads rank as owners
	// only members that answered (transfer.Pool.Answered), without waiting.
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			var addrs []string
			for _, m := range p.members.Members() {
				if m.ID != id {
					addrs = append(addrs, m.Addr)
				}
			}
			p.pool.Answered(addrs)
			select {
			case <-bg.Done():
				return
			case <-t.C:
			}
		}
	}()
	if p.syncer != nil {
		// Follow every member while they fit in the syncer, so a download's
		// first choices already see its parents' state.
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			t := time.NewTicker(time.Second)
			defer t.Stop()
			for {
				if ms := p.members.Members(); len(ms)-1 <= cfg.Upload.Syncer.Capacity/2 {
					for _, m := range ms {
						if m.ID != id {
							p.syncer.Follow(m.ID, m.Addr)
						}
					}
				}
				select {
				case <-bg.Done():
					return
				case <-t.C:
				}
			}
		}()
	}
	// One tracker: the server records who registers for the digests this
	// node owns, and its downloads of them take pieces from those nodes.
	// p2p.share_private = false: private content stays off the peer port.
	var share *sharing.Policy
	var source peer.Source
	var holdings sharing.Holdings = store
	if !cfg.P2P.SharePrivate && checker != nil {
		share = sharing.New(false, checker)
		holdings = sharing.Announced{Holdings: store, Policy: share}
	}
	registrations := tracker.New(nil)
	dlOpts := swarm.DownloaderOptions{
		Self:         p.self,
		Members:      p.members,
		Transport:    p.pool,
		Collector:    collector.New(collOpts),
		Tracker:      registrations,
		Upstream:     up,
		PeerUpstream: peerUp,
		MaxPeers:     cfg.P2P.MaxPeers,
		Logger:       log,
	}
	if p.syncer != nil {
		dlOpts.Follower = p.syncer
	}
	downloads := swarm.NewDownloader(dlOpts)
	taskOpts.Filler = downloads
	if bs, ok := taskOpts.Sizer.(blobSizer); ok {
		bs.peers = p
		bs.share = share
		taskOpts.Sizer = bs
	}
	tasks := task.NewManager(taskOpts)
	srvOpts := swarm.ServerOptions{
		Members:    p.members,
		Tracker:    registrations,
		Store:      store,
		Tasks:      tasks,
		Downloads:  downloads,
		Registries: up,
		MaxPeers:   cfg.P2P.MaxPeers,
		Pieces:     taskOpts.Pieces,
		Logger:     log,
		Self:       id,
		Answered:   p.pool.Answered,
		Refused:    m.PeerCallRefused,
	}
	if p.syncer != nil && cfg.P2P.Selector == collector.SelectorState {
		// State-aware seeding: the owner hands pieces to fast nodes to
		// read from the upstream.
		srvOpts.Delegations = &swarm.Delegations{Readers: cfg.Pieces.Readers}
		srvOpts.Uploads = uploads{meter: meter, syncer: p.syncer}
	}
	if share != nil {
		srvOpts.Sharing = share
	}
	sw := swarm.NewServer(srvOpts)
	source = sw
	if share != nil {
		source = sharing.Source{Source: sw, Policy: share}
	}
	p.owners = swarm.AnsweringMembers{Self: id, Live: p.members, Answerer: p.pool}
	owners := p.owners
	var manifestSharing manifests.Sharing
	if share != nil {
		manifestSharing = share
	}
	p.manifests = manifests.New(manifests.Options{Self: p.self, Members: owners, Sharing: manifestSharing, Auth: sw, Transport: p.pool, Store: store,
		Upstream: peerUp, Registries: up, MaxSize: int64(cfg.Upstream.MaxManifestSize), UpstreamTimeout: cfg.Upstream.Timeout, Logger: log})
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		p.manifests.Run(bg)
	}()
	m.GaugeFunc("tracker_holdings", "Blobs other nodes announced they hold complete, among the digests this node owns (one per node and blob).",
		func() float64 { return float64(registrations.Held()) })
	// Forget the registrations and holdings of nodes gone for longer than
	// an announcer's refresh (5 min): one back by then has told again.
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		const gone = 10 * time.Minute
		seen := map[string]time.Time{}
		t := time.NewTicker(30 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-bg.Done():
				return
			case now := <-t.C:
				for _, m := range p.members.Members() {
					seen[m.ID] = now
				}
				live := map[string]bool{}
				for id, at := range seen {
					if now.Sub(at) < gone {
						live[id] = true
					} else {
						delete(seen, id)
					}
				}
				registrations.Retain(live)
			}
		}
	}()
	announcer := swarm.NewAnnouncer(swarm.AnnouncerOptions{Self: id, Members: owners, Holdings: holdings, Transport: p.pool, Logger: log})
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		announcer.Run(bg)
	}()

	faults, inflate := injectedFaults(log)
	hostSync := statesync.NewServer(statesync.ServerOptions{
		Self: func() *pb.Host {
			st := meter.State().Proto()
			if inflate {
				st = &pb.HostState{MaxTxBandwidth: 100e9 / 8, UploadLimit: 1000, FreeBytes: 1 << 50, MeasuredAt: st.GetMeasuredAt()}
			}
			return &pb.Host{Id: id, Addr: addr, State: st}
		},
		Interval: cfg.Upload.Syncer.Interval,
		Capacity: cfg.Upload.Syncer.Capacity,
		Logger:   log,
	})
	m.GaugeFunc("statesync_subscribers", "Nodes following this node's host state over SyncHost.", func() float64 { return float64(hostSync.Subscribers()) })
	m.GaugeFunc("peer_uploads_in_flight", "Pieces being sent to peers now.", func() float64 { return float64(meter.Uploads()) })
	var ledger *seeding.Ledger
	if cfg.Upload.SuperSeed {
		ledger = seeding.New(seeding.Options{})
	}
	p.server = peer.NewServer(peer.Options{Source: source, Children: sw, Auth: sw, Meter: meter, Ledger: ledger, HostSync: hostSync, Tracker: sw, Manifests: p.manifests, TLS: serverTLS,
		WriteStall: cfg.Limits.WriteStall, Faults: faults, Metrics: m, Logger: log})
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		if err := p.server.Serve(ln); err != nil {
			log.Error("peer server stopped", "err", err)
		}
	}()
	return p, tasks, nil
}

// uploads are upload capacities: this node's from its meter, the others'
// from the host state they stream.
type uploads struct {
	meter  *hoststate.Meter
	syncer *statesync.Syncer
}

func (u uploads) OwnUpload() float64 { return float64(u.meter.State().MaxTxBps) }

func (u uploads) UploadOf(id string) float64 {
	st, _, ok := u.syncer.State(id)
	if !ok {
		return 0
	}
	return float64(st.GetMaxTxBandwidth())
}

// leave announces that this node leaves the cluster; uploads in flight go on.
func (p *peers) leave() error {
	if p == nil {
		return nil
	}
	return p.members.Leave()
}

// shutdownServer lets the uploads in flight finish until ctx ends.
func (p *peers) shutdownServer(ctx context.Context) error {
	if p == nil {
		return nil
	}
	return p.server.Shutdown(ctx)
}

// setUpload applies upload.limit and upload.rate to a running node.
func (p *peers) setUpload(limit int, bps uint64) {
	if p != nil {
		p.meter.SetUpload(limit, bps)
	}
}

func (p *peers) close() error {
	if p == nil {
		return nil
	}
	var errs []error
	p.closeOnce.Do(func() {
		if p.server != nil {
			// Uploads had their time in shutdownServer: what is left is cut.
			errs = append(errs, p.server.Close())
		}
		if p.members != nil {
			errs = append(errs, p.members.Close())
		}
		if p.syncer != nil {
			p.syncer.Close()
		}
		p.cancel()
		p.wg.Wait()
		p.pool.Close()
	})
	return errors.Join(errs...)
}

// SizeFromPeers asks d's owner and the next in rank (among the members
// that rank as owners, as downloads do), who hold it when the
// cluster pulled it before, for its size: what a download needs to start
// while the registry cannot answer.
func (p *peers) SizeFromPeers(ctx context.Context, registry, repo string, d digest.Digest) (int64, error) {
	ms := p.owners.Members()
	ids := make([]string, 0, len(ms))
	addrs := make(map[string]string, len(ms))
	for _, m := range ms {
		ids = append(ids, m.ID)
		addrs[m.ID] = m.Addr
	}
	var errs []error
	for i, id := range owner.Rank(d.String(), ids) {
		if i == 3 {
			break
		}
		if id == p.self.ID {
			continue
		}
		rctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		resp, err := p.pool.Register(rctx, addrs[id], &pb.RegisterRequest{Digest: d.String(), HostId: p.self.ID, Addr: p.self.Addr, Registry: registry, Repository: repo})
		cancel()
		if err == nil && resp.GetSize() > 0 {
			return resp.GetSize(), nil
		}
		errs = append(errs, fmt.Errorf("%s: size %d: %w", id, resp.GetSize(), err))
	}
	return 0, fmt.Errorf("no member told the size of %s: %w", d, errors.Join(errs...))
}

// manifestCluster is the cluster's manifests and tags; nil without peers.
func (p *peers) manifestCluster() *manifests.Cluster {
	if p == nil {
		return nil
	}
	return p.manifests
}

// membersFunc lists live members for the debug endpoint; nil without peers.
func (p *peers) membersFunc() func() any {
	if p == nil {
		return nil
	}
	return func() any {
		ms := p.members.Members()
		out := make([]inspect.Member, 0, len(ms))
		for _, m := range ms {
			v := inspect.Member{ID: m.ID, Addr: m.Addr, Self: m.ID == p.self.ID}
			if p.syncer != nil && !v.Self {
				st, age, ok := p.syncer.State(m.ID)
				v.Followed = ok
				if ok {
					v.State, v.StateAge = st, age.Seconds()
				}
				v.Weight = collector.Weight(st, ok)
			}
			out = append(out, v)
		}
		return out
	}
}

// readyFunc says whether the node is ready: it has joined another member, or
// it has no seeds, or it has seen nobody for aloneAfter since started; nil
// without peers (always ready once serving).
func (p *peers) readyFunc(started time.Time, aloneAfter time.Duration, seeds bool) func() (bool, string) {
	if p == nil {
		return nil
	}
	return func() (bool, string) {
		n := len(p.members.Members())
		switch {
		case n > 1, !seeds:
			return true, ""
		case time.Since(started) >= aloneAfter:
			return true, ""
		}
		return false, fmt.Sprintf("joining the cluster: %d member seen, ready alone after %v\n", n, aloneAfter)
	}
}

// peerIdentity is what this node proves membership with: the gossip keys of
// the cluster secret, and the peer port's certificate, from the operator's
// CA when p2p.tls is set, else signed by the secret's CA. Both nil:
// p2p.insecure.
func peerIdentity(cfg config.P2P, id string, log *slog.Logger) (*trust.Identity, [][]byte, error) {
	var secrets [][]byte
	if cfg.SecretFile != "" {
		var err error
		if secrets, err = trust.ReadSecretFile(cfg.SecretFile); err != nil {
			return nil, nil, err
		}
	}
	var keys [][]byte
	if secrets != nil {
		keys = trust.GossipKeys(secrets)
	}
	switch {
	case cfg.TLS.Set():
		ident, err := trust.FromFiles(cfg.TLS.CA, cfg.TLS.Cert, cfg.TLS.Key, id)
		if err != nil {
			return nil, nil, err
		}
		log.Info("peers authenticated by certificates of the operator's CA", "ca", cfg.TLS.CA, "cert", cfg.TLS.Cert)
		if keys == nil {
			log.Warn("gossip is not encrypted: p2p.tls without p2p.secret_file; peer ports still require certificates")
		}
		return ident, keys, nil
	case secrets != nil:
		ident, err := trust.NewIdentity(secrets, id, time.Now())
		if err != nil {
			return nil, nil, err
		}
		log.Info("peers authenticated by the cluster secret", "secrets", len(secrets), "file", cfg.SecretFile)
		return ident, keys, nil
	}
	log.Warn("p2p.insecure: peer port and gossip are plaintext and unauthenticated; any host that reaches them is a member")
	return nil, nil, nil
}

// cluster is the nodes a preheat spreads blobs to: this one (also without
// peers) and every live member.
func (p *peers) cluster(tasks *task.Manager) preheat.Cluster {
	return preheatCluster{p: p, tasks: tasks}
}

type preheatCluster struct {
	p     *peers
	tasks *task.Manager
}

func (c preheatCluster) Nodes() []preheat.Node {
	self := "self"
	if c.p != nil {
		self = c.p.self.ID
	}
	nodes := []preheat.Node{localNode{id: self, tasks: c.tasks}}
	if c.p == nil {
		return nodes
	}
	ms := c.p.members.Members()
	slices.SortFunc(ms, func(a, b membership.Member) int { return strings.Compare(a.ID, b.ID) })
	for _, m := range ms {
		if m.ID != self {
			nodes = append(nodes, remoteNode{member: m, self: self, pool: c.p.pool})
		}
	}
	return nodes
}

// localNode fetches with this node's task manager.
type localNode struct {
	id    string
	tasks *task.Manager
}

func (n localNode) ID() string { return n.id }

func (n localNode) Fetch(ctx context.Context, registry, repo string, d digest.Digest, report func(done, size int64)) error {
	return n.tasks.Fetch(ctx, task.Request{Digest: d, Registry: registry, Repo: repo, ForPeers: true}, func(done, size int64) error {
		report(done, size)
		return nil
	})
}

// remoteNode asks a member over its peer port (Preheat).
type remoteNode struct {
	member membership.Member
	self   string
	pool   *transfer.Pool
}

func (n remoteNode) ID() string { return n.member.ID }

func (n remoteNode) Fetch(ctx context.Context, registry, repo string, d digest.Digest, report func(done, size int64)) error {
	req := &pb.PreheatRequest{HostId: n.self, Registry: registry, Repository: repo, Digest: d.String()}
	return n.pool.Preheat(ctx, n.member.Addr, req, func(pr *pb.PreheatProgress) { report(pr.GetDone(), pr.GetSize()) })
}
