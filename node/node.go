// Package node assembles one registry-proxy from its configuration: the blob
// store, the upstream client, the piece collector, the task manager and the
// mirror's HTTP server.
package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/registry-proxy/registry-proxy/blobstore"
	"github.com/registry-proxy/registry-proxy/config"
	"github.com/registry-proxy/registry-proxy/credprovider"
	"github.com/registry-proxy/registry-proxy/ctrstore"
	"github.com/registry-proxy/registry-proxy/internal/connlimit"
	"github.com/registry-proxy/registry-proxy/internal/pace"
	"github.com/registry-proxy/registry-proxy/metrics"
	"github.com/registry-proxy/registry-proxy/p2p/collector"
	"github.com/registry-proxy/registry-proxy/p2p/manifests"
	"github.com/registry-proxy/registry-proxy/p2p/sharing"
	"github.com/registry-proxy/registry-proxy/piece"
	"github.com/registry-proxy/registry-proxy/preheat"
	"github.com/registry-proxy/registry-proxy/proxy"
	"github.com/registry-proxy/registry-proxy/proxy/access"
	"github.com/registry-proxy/registry-proxy/proxy/upstream"
	"github.com/registry-proxy/registry-proxy/task"
)

// Version is set by the build.
var Version = "dev"

// Node is a running registry-proxy.
type Node struct {
	cfg   config.Config
	log   *slog.Logger
	ln    net.Listener
	srv   *http.Server
	admLn net.Listener
	adm   *http.Server
	store *blobstore.Store
	up    *upstream.Client
	tasks *task.Manager
	p2p   *peers
	m     *metrics.Metrics
	// download paces piece downloads (download.rate).
	download *pace.Limiter
	// draining is set once Shutdown starts: /readyz says so.
	draining *atomic.Bool
	cancel   context.CancelFunc
	wg       sync.WaitGroup
	errc     chan error
}

// Start opens the store, binds the listener and starts serving.
func Start(ctx context.Context, cfg config.Config, log *slog.Logger) (*Node, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	m := metrics.New(Version)
	ctd := openContainerd(cfg.Containerd, log)
	var external blobstore.External
	if ctd != nil {
		external = containerdContent{ctd}
		m.GaugeFunc("containerd_blobs", "Blobs in containerd's content store (the configured namespaces) that this node serves; 0 while containerd is unreachable.",
			func() float64 { return float64(ctd.Len()) })
	}
	store, err := blobstore.Open(ctx, cfg.DataDir, blobstore.Options{
		External:      external,
		Metrics:       m,
		HighWater:     int64(cfg.Store.HighWater),
		LowWater:      int64(cfg.Store.LowWater),
		MaxAge:        cfg.Store.MaxAge,
		PartialMaxAge: cfg.Store.PartialMaxAge,
		Logger:        log,
	})
	if err != nil {
		return nil, err
	}
	up, err := upstream.New(upstream.Options{
		Registries:            cfg.Upstream.Registries,
		Allow:                 cfg.Upstream.Allow,
		MaxConnsPerHost:       cfg.Limits.UpstreamConnsPerHost,
		ResponseHeaderTimeout: cfg.Upstream.ResponseHeaderTimeout,
		Attempts:              cfg.Upstream.Attempts,
		Backoff:               cfg.Upstream.Backoff,
		RedirectTTL:           cfg.Upstream.RedirectTTL,
		UserAgent:             "registry-proxy/" + Version,
		Metrics:               m,
		Logger:                log,
	})
	if err != nil {
		return nil, err
	}
	creds, err := nodeCredentials(cfg.Upstream, m, log)
	if err != nil {
		return nil, err
	}
	// Fetches on peers' behalf, and for clients of repositories in access
	// mode node, use this node's credentials, never a client's.
	peerUp := up.WithNodeCredentials(creds)
	policy := accessPolicy(cfg.Access)
	var checker *access.Checker
	if cfg.Access.Check {
		checker = access.New(access.Options{Upstream: up, NodeUpstream: peerUp, Policy: policy, TTL: cfg.Access.TTL, Timeout: cfg.Upstream.Timeout, Metrics: m,
			PublicTTL: cfg.Access.PublicTTL, Anonymous: up.WithNodeCredentials(upstream.Chain{})})
	}
	taskOpts := task.Options{
		Store:          store,
		Sizer:          blobSizer{up: up, peerUp: peerUp, checker: checker},
		OpenTimeout:    cfg.Upstream.Timeout,
		MaxBlobSize:    int64(cfg.Store.MaxBlobSize),
		MaxTasks:       cfg.Limits.Tasks,
		MaxPerRegistry: cfg.Limits.TasksPerRegistry,
		IdleStop:       cfg.Limits.IdleDownload,
		Pieces:         piece.Planner{Min: int64(cfg.Pieces.MinSize)},
		Metrics:        m,
		Logger:         log,
	}
	download := pace.New(uint64(cfg.Download.Rate))
	collOpts := collector.Options{
		Download:            download,
		Concurrency:         cfg.Pieces.Concurrency,
		PerParent:           cfg.Pieces.PerParent,
		UpstreamConcurrency: cfg.Pieces.Upstream,
		PieceTimeout:        cfg.Pieces.Timeout,
		MinRate:             float64(cfg.Pieces.MinRate),
		RaceAfter:           cfg.Pieces.RaceAfter,
		Attempts:            cfg.Pieces.Attempts,
		Selector:            cfg.P2P.Selector,
		Metrics:             m,
		Logger:              log,
	}
	var p2p *peers
	var tasks *task.Manager
	if cfg.P2P.PeerListen == "" {
		taskOpts.Filler = task.UpstreamFiller{Collector: collector.New(collOpts), Upstream: up, NodeUpstream: peerUp}
		tasks = task.NewManager(taskOpts)
	} else {
		if p2p, tasks, err = startPeers(ctx, cfg, store, up, peerUp, checker, collOpts, taskOpts, m, log); err != nil {
			return nil, err
		}
	}
	mf := p2p.manifestCluster()
	if mf == nil {
		// A node alone still keeps its tag resolutions for outages.
		mf = manifests.New(manifests.Options{Store: store, Upstream: peerUp, Registries: up, MaxSize: int64(cfg.Upstream.MaxManifestSize),
			UpstreamTimeout: cfg.Upstream.Timeout, Logger: log})
	}
	draining := new(atomic.Bool)
	srv := proxy.New(proxy.Options{
		Manifests:       mf,
		StaleIfError:    cfg.Manifests.StaleIfError,
		Upstream:        up,
		NodeUpstream:    peerUp,
		Policy:          policy,
		Store:           store,
		Tasks:           tasks,
		DefaultRegistry: cfg.DefaultRegistry,
		MaxManifestSize: int64(cfg.Upstream.MaxManifestSize),
		UpstreamTimeout: cfg.Upstream.Timeout,
		WriteStall:      cfg.Limits.WriteStall,
		Access:          checker,
		Ready:           readyFunc(draining, p2p.readyFunc(time.Now(), cfg.P2P.AloneAfter, len(cfg.P2P.Join) > 0)),
		Members:         p2p.membersFunc(),
		Running:         tasks.Running,
		Preheat:         &preheat.Preheater{Manifests: peerUp, Cluster: p2p.cluster(tasks), Logger: log},
		Metrics:         m,
		Pprof:           cfg.Admin.Pprof,
		Logger:          log,
	})
	m.GaugeFunc("tasks_in_flight", "Blob downloads running now.", func() float64 { return float64(tasks.Len()) })
	m.GaugeFunc("store_bytes", "Bytes of complete blobs in the store.", func() float64 { _, b := store.Usage(); return float64(b) })
	m.GaugeFunc("store_blobs", "Complete blobs in the store.", func() float64 { n, _ := store.Usage(); return float64(n) })
	rawLn, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		tasks.Close()
		p2p.close()
		return nil, fmt.Errorf("listen %s: %w", cfg.Listen, err)
	}
	cl := connlimit.New(rawLn, cfg.Limits.ClientConns)
	cl.Refused = func(a net.Addr) {
		log.Warn("connection refused: too many from one address, none of them idle", "remote", a.String(), "limit", cfg.Limits.ClientConns)
	}
	cl.Evicted = func(a net.Addr) {
		log.Debug("idle connection closed to let a new one from the same address in", "remote", a.String(), "limit", cfg.Limits.ClientConns)
	}
	var ln net.Listener = cl
	var admLn net.Listener
	if cfg.Admin.Listen != "" {
		if admLn, err = net.Listen("tcp", cfg.Admin.Listen); err != nil {
			ln.Close()
			tasks.Close()
			p2p.close()
			return nil, fmt.Errorf("admin listen %s: %w", cfg.Admin.Listen, err)
		}
	}
	n := &Node{
		cfg:      cfg,
		log:      log,
		ln:       ln,
		store:    store,
		up:       up,
		tasks:    tasks,
		p2p:      p2p,
		m:        m,
		download: download,
		errc:     make(chan error, 2),
		admLn:    admLn,
		draining: draining,
		srv: &http.Server{
			Handler:           srv.Handler(),
			ConnState:         cl.ConnState,
			ReadHeaderTimeout: 10 * time.Second,
			IdleTimeout:       2 * time.Minute,
			MaxHeaderBytes:    64 << 10,
			ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
		},
	}
	gcCtx, cancel := context.WithCancel(context.Background())
	n.cancel = cancel
	if ctd != nil {
		n.wg.Add(1)
		go func() {
			defer n.wg.Done()
			ctd.Run(gcCtx)
		}()
	}
	n.wg.Add(2)
	go func() {
		defer n.wg.Done()
		store.RunGC(gcCtx, cfg.Store.GCInterval)
	}()
	go func() {
		defer n.wg.Done()
		if err := n.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			n.errc <- err
		}
		close(n.errc)
	}()
	attrs := []any{"version", Version, "listen", ln.Addr().String(), "data_dir", cfg.DataDir, "default_registry", cfg.DefaultRegistry}
	if admLn != nil {
		n.adm = &http.Server{Handler: srv.AdminHandler(), ReadHeaderTimeout: 10 * time.Second, IdleTimeout: time.Minute}
		n.wg.Add(1)
		go func() {
			defer n.wg.Done()
			if err := n.adm.Serve(admLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("admin listener stopped", "err", err)
			}
		}()
		attrs = append(attrs, "admin", admLn.Addr().String())
	}
	if p2p != nil {
		attrs = append(attrs, "node_id", p2p.self.ID, "peer_addr", p2p.self.Addr, "selector", cfg.P2P.Selector)
	}
	log.Info("registry-proxy serving", attrs...)
	return n, nil
}

// openContainerd returns containerd's content store as configured, nil when
// it is off, or the default socket does not exist.
func openContainerd(c config.Containerd, log *slog.Logger) *ctrstore.Store {
	if c.Address == "" {
		return nil
	}
	if _, err := os.Stat(c.Address); err != nil && c.Address == config.DefaultContainerdAddress {
		log.Info("no containerd socket; containerd's content store is not served", "address", c.Address, "err", err)
		return nil
	}
	return ctrstore.New(ctrstore.Options{Address: c.Address, Namespaces: c.Namespaces, ContentDir: c.ContentDir, ListInterval: c.ListInterval, Logger: log})
}

// containerdContent is containerd's content store as the blob store's
// external store.
type containerdContent struct{ *ctrstore.Store }

func (c containerdContent) Open(ctx context.Context, d digest.Digest) (blobstore.Content, int64, error) {
	return c.Store.Open(ctx, d)
}

// blobSizer learns a new download's size: with the client's credentials,
// which also answers the access check for it, or with this node's own for a
// download on peers' behalf or for a client in access mode node (which
// answers its access check too).
type blobSizer struct {
	up, peerUp *upstream.Client
	checker    *access.Checker
	// peers tell the size while the registry cannot; nil without peers.
	peers peerSizer
	// share learns whether a blob a client opened may go to peers
	// (p2p.share_private = false); nil: everything may.
	share *sharing.Policy
}

// peerSizer learns a blob's size from the members holding it; *peers is one.
type peerSizer interface {
	SizeFromPeers(ctx context.Context, registry, repo string, d digest.Digest) (int64, error)
}

func (s blobSizer) BlobSize(ctx context.Context, r task.Request) (int64, error) {
	if r.ForPeers {
		return s.peerUp.BlobSize(ctx, r.Registry, r.Repo, r.Digest, nil)
	}
	up := s.up
	if r.NodeCredentials {
		up = s.peerUp
	}
	size, err := up.BlobSize(ctx, r.Registry, r.Repo, r.Digest, r.Header)
	if err != nil && upstream.Unreachable(err) && s.peers != nil {
		// The registry cannot answer: members holding the blob can, for a
		// client this node may serve without asking it (allowed lately,
		// or a public repository); nothing is fetched for another.
		if s.checker != nil {
			if cerr := s.checker.Check(ctx, r.Registry, r.Repo, r.Digest, access.Blob, r.Header); cerr != nil {
				return 0, cerr
			}
		}
		if n, perr := s.peers.SizeFromPeers(ctx, r.Registry, r.Repo, r.Digest); perr == nil {
			return n, nil
		}
		return 0, err
	}
	if err == nil && s.checker != nil {
		// The client that opened the task just read the blob's HEAD
		// upstream, with its own credentials or the node's.
		s.checker.Allow(r.Registry, r.Repo, r.Digest, access.Blob, r.Header)
	}
	if err == nil && s.share != nil {
		s.share.LearnBlob(ctx, r.Registry, r.Repo, r.Digest)
	}
	return size, err
}

// nodeCredentials are this node's own registry credentials: the files of
// [upstream.credentials], then upstream.docker_config, then kubelet's
// credential provider plugins.
func nodeCredentials(u config.Upstream, m *metrics.Metrics, log *slog.Logger) (upstream.Credentials, error) {
	files := upstream.FileCredentials{Registries: map[string]upstream.CredentialFiles{}, DockerConfig: u.DockerConfig}
	for name, c := range u.Credentials {
		files.Registries[name] = upstream.CredentialFiles{Username: c.Username, PasswordFile: c.PasswordFile, TokenFile: c.TokenFile}
	}
	cp := u.CredentialProviders
	if cp.Config == "" {
		return files, nil
	}
	plugins, err := credprovider.New(credprovider.Options{ConfigFile: cp.Config, BinDir: cp.BinDir, Timeout: cp.Timeout, Logger: log, Metrics: m})
	if err != nil {
		return nil, fmt.Errorf("upstream.credential_providers: %w", err)
	}
	return upstream.Chain{files, plugins}, nil
}

// accessPolicy is [access.registries] as an access.Policy.
func accessPolicy(a config.Access) *access.Policy {
	rules := map[string]access.Rule{}
	for name, ra := range a.Registries {
		rules[name] = access.Rule{Mode: access.Mode(ra.Mode), Repositories: ra.Repositories}
	}
	return access.NewPolicy(rules)
}

// Addr is the mirror's listening address.
func (n *Node) Addr() string { return n.ln.Addr().String() }

// AdminAddr is the admin listener's address, empty when it is off.
func (n *Node) AdminAddr() string {
	if n.admLn == nil {
		return ""
	}
	return n.admLn.Addr().String()
}

// Metrics returns the node's metrics, the registry its /metrics serves.
func (n *Node) Metrics() *metrics.Metrics { return n.m }

// Store returns the node's blob store.
func (n *Node) Store() *blobstore.Store { return n.store }

// Err reports a serving failure; it is closed when serving stops.
func (n *Node) Err() <-chan error { return n.errc }

// Shutdown drains the node: it leaves the cluster (peers stop choosing it)
// and says so on /readyz, starts no new download, stops accepting requests,
// and lets client responses and uploads to peers in flight finish until ctx
// ends. Then it stops the downloads (their pieces stay on disk to resume).
func (n *Node) Shutdown(ctx context.Context) error {
	start := time.Now()
	n.draining.Store(true)
	var errs []error
	if err := n.p2p.leave(); err != nil {
		errs = append(errs, fmt.Errorf("leaving the cluster: %w", err))
	}
	n.tasks.Drain()
	running := n.tasks.Len()
	n.log.Info("draining: left the cluster, finishing client responses and uploads", "downloads", running, "deadline", deadlineOf(ctx))
	var wg sync.WaitGroup
	var peerErr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		peerErr = n.p2p.shutdownServer(ctx)
	}()
	mirrorErr := n.srv.Shutdown(ctx)
	wg.Wait()
	if mirrorErr != nil || peerErr != nil {
		n.log.Warn("drain deadline passed; cutting off the rest", "after", time.Since(start).Round(time.Millisecond))
		n.srv.Close()
		errs = append(errs, mirrorErr, peerErr)
	} else {
		n.log.Info("drained", "after", time.Since(start).Round(time.Millisecond))
	}
	if n.adm != nil {
		n.adm.Close()
	}
	n.tasks.Close()
	n.up.Close()
	errs = append(errs, n.p2p.close())
	n.cancel()
	n.wg.Wait()
	return errors.Join(errs...)
}

func deadlineOf(ctx context.Context) any {
	if d, ok := ctx.Deadline(); ok {
		return time.Until(d).Round(time.Second)
	}
	return "none"
}

// readyFunc is not ready while draining, else as joined says.
func readyFunc(draining *atomic.Bool, joined func() (bool, string)) func() (bool, string) {
	return func() (bool, string) {
		if draining.Load() {
			return false, "shutting down\n"
		}
		if joined == nil {
			return true, ""
		}
		return joined()
	}
}

// Reloadable are the keys Reload applies to a running node (log.level is
// applied by the caller, who owns the logger).
var Reloadable = []string{"download.rate", "log.level", "store.high_water", "store.low_water", "store.max_age", "upload.limit", "upload.rate"}

// Reload applies what may change while running from cfg, which must have
// been loaded the way the running configuration was. It returns the keys
// it applied and the changed keys that need a restart.
func (n *Node) Reload(cfg config.Config) (applied, restart []string, err error) {
	if err := cfg.Validate(); err != nil {
		return nil, nil, fmt.Errorf("config: %w", err)
	}
	for _, k := range config.Changed(n.cfg, cfg) {
		if slices.Contains(Reloadable, k) {
			applied = append(applied, k)
		} else {
			restart = append(restart, k)
		}
	}
	n.cfg.Log.Level = cfg.Log.Level
	n.cfg.Store.HighWater, n.cfg.Store.LowWater, n.cfg.Store.MaxAge = cfg.Store.HighWater, cfg.Store.LowWater, cfg.Store.MaxAge
	n.cfg.Upload.Limit, n.cfg.Upload.Rate = cfg.Upload.Limit, cfg.Upload.Rate
	n.cfg.Download.Rate = cfg.Download.Rate
	n.download.Set(uint64(cfg.Download.Rate)) // the meter reports it from there
	n.store.SetLimits(int64(cfg.Store.HighWater), int64(cfg.Store.LowWater), cfg.Store.MaxAge)
	n.p2p.setUpload(cfg.Upload.Limit, uint64(cfg.Upload.Rate))
	return applied, restart, nil
}

// PeerAddr is the peer address, empty without peers.
func (n *Node) PeerAddr() string {
	if n.p2p == nil {
		return ""
	}
	return n.p2p.self.Addr
}
