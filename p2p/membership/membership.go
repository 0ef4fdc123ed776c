// Package membership tracks which registry-proxy nodes are alive, with
// hashicorp/memberlist gossip. Nodes join through static seeds (other nodes'
// peer addresses) or a DNS name re-resolved now and then (a Kubernetes
// headless Service). Gossip runs on the peer port plus one.
package membership

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
)

// Member is a live node.
type Member struct {
	ID   string
	Addr string // peer address: gRPC and piece data
}

// Options configure membership.
type Options struct {
	NodeID string
	// PeerAddr is this node's peer address as others reach it (host:port).
	PeerAddr string
	// Join lists seeds: peer addresses host:port, or dns:NAME:PORT.
	Join []string
	// Rejoin is how often DNS seeds are re-resolved and joined, and the
	// longest wait between tries while this node sees no other member.
	Rejoin time.Duration
	// RetryMin is the first wait before trying the seeds again while alone;
	// it doubles up to Rejoin.
	RetryMin time.Duration
	// Resolve looks up a DNS name; net.DefaultResolver when nil.
	Resolve func(ctx context.Context, host string) ([]string, error)
	// Keys encrypt and authenticate gossip (AES, 16, 24 or 32 bytes): the
	// first encrypts, every one is accepted. Nil: gossip in the clear
	// (p2p.insecure).
	Keys   [][]byte
	Logger *slog.Logger
}

// Membership is this node's view of the cluster.
type Membership struct {
	opts      Options
	log       *slog.Logger
	ml        *memberlist.Memberlist
	cancel    context.CancelFunc
	wg        sync.WaitGroup
	leaveOnce sync.Once

	refusedMu sync.Mutex
	refused   map[string]struct{}
}

// GossipAddr derives the gossip address from a peer address: port + 1.
func GossipAddr(peerAddr string) (string, error) {
	host, port, err := net.SplitHostPort(peerAddr)
	if err != nil {
		return "", fmt.Errorf("membership: peer address %q: %w", peerAddr, err)
	}
	p, err := strconv.Atoi(port)
	if err != nil || p <= 0 || p >= 65535 {
		return "", fmt.Errorf("membership: peer address %q: bad port", peerAddr)
	}
	return net.JoinHostPort(host, strconv.Itoa(p+1)), nil
}

type meta string

func (m meta) NodeMeta(limit int) []byte                { return []byte(m)[:min(len(m), limit)] }
func (meta) NotifyMsg([]byte)                           {}
func (meta) GetBroadcasts(overhead, limit int) [][]byte { return nil }
func (meta) LocalState(join bool) []byte                { return nil }
func (meta) MergeRemoteState(buf []byte, join bool)     {}

// Start joins the cluster (or starts one alone).
func Start(ctx context.Context, opts Options) (*Membership, error) {
	if opts.NodeID == "" {
		return nil, errors.New("membership: node id required")
	}
	if opts.Rejoin <= 0 {
		opts.Rejoin = 15 * time.Second
	}
	if opts.RetryMin <= 0 {
		opts.RetryMin = 200 * time.Millisecond
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Resolve == nil {
		opts.Resolve = net.DefaultResolver.LookupHost
	}
	gossip, err := GossipAddr(opts.PeerAddr)
	if err != nil {
		return nil, err
	}
	host, port, _ := net.SplitHostPort(gossip)
	p, _ := strconv.Atoi(port)
	logger := opts.Logger.With("component", "membership")

	cfg := memberlist.DefaultLANConfig()
	cfg.Name = opts.NodeID
	cfg.BindAddr, cfg.BindPort = host, p
	cfg.AdvertiseAddr, cfg.AdvertisePort = host, p
	cfg.Delegate = meta(opts.PeerAddr)
	cfg.Logger = log.New(&logWriter{logger}, "", 0)
	if len(opts.Keys) > 0 {
		kr, err := memberlist.NewKeyring(opts.Keys, opts.Keys[0])
		if err != nil {
			return nil, fmt.Errorf("membership: gossip keys: %w", err)
		}
		cfg.Keyring = kr
		cfg.GossipVerifyIncoming, cfg.GossipVerifyOutgoing = true, true
	}
	ml, err := memberlist.Create(cfg)
	if err != nil {
		return nil, fmt.Errorf("membership: gossip on %s: %w", gossip, err)
	}
	bg, cancel := context.WithCancel(context.Background())
	m := &Membership{opts: opts, log: logger, ml: ml, cancel: cancel, refused: map[string]struct{}{}}
	m.join(ctx)
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		m.rejoin(bg)
	}()
	return m, nil
}

// seeds resolves the join list into gossip addresses.
func (m *Membership) seeds(ctx context.Context) []string {
	var out []string
	for _, s := range m.opts.Join {
		if rest, ok := strings.CutPrefix(s, "dns:"); ok {
			name, port, err := net.SplitHostPort(rest)
			if err != nil {
				m.log.Warn("bad DNS seed", "seed", s, "err", err)
				continue
			}
			ips, err := m.opts.Resolve(ctx, name)
			if err != nil {
				m.log.Warn("resolving seed", "name", name, "err", err)
				continue
			}
			for _, ip := range ips {
				if g, err := GossipAddr(net.JoinHostPort(ip, port)); err == nil {
					out = append(out, g)
				}
			}
			continue
		}
		if g, err := GossipAddr(s); err == nil {
			out = append(out, g)
		} else {
			m.log.Warn("bad seed", "seed", s, "err", err)
		}
	}
	return out
}

func (m *Membership) join(ctx context.Context) {
	seeds := m.seeds(ctx)
	if len(seeds) == 0 {
		return
	}
	n, err := m.ml.Join(seeds)
	if err != nil && n == 0 {
		m.log.Debug("join found nobody yet", "seeds", seeds, "err", err)
		return
	}
	m.log.Info("joined", "contacted", n, "members", m.ml.NumMembers())
}

func (m *Membership) rejoin(ctx context.Context) {
	dns := false
	for _, s := range m.opts.Join {
		dns = dns || strings.HasPrefix(s, "dns:")
	}
	if len(m.opts.Join) == 0 {
		return
	}
	// Alone, a node tries its seeds again soon and then less often: in a
	// rollout every node starts at once and the seeds come up a moment
	// later. Joined, it re-resolves DNS seeds every Rejoin.
	wait := m.opts.RetryMin
	t := time.NewTimer(wait)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		alone := m.ml.NumMembers() <= 1
		if alone || dns {
			m.join(ctx)
		}
		switch {
		case m.ml.NumMembers() > 1:
			wait = m.opts.Rejoin
		case alone:
			wait = min(wait*2, m.opts.Rejoin)
		default: // dropped to alone since the last try
			wait = m.opts.RetryMin
		}
		t.Reset(wait)
	}
}

// Members returns the live members, this node included, sorted by id. A
// member's peer address is bound to where it gossips from: a node whose
// advertised peer address is not its gossip address's host and port - 1
// (GossipAddr) is no member (logged once), so nobody can send the cluster
// to dial an address that is not its own.
func (m *Membership) Members() []Member {
	var out []Member
	for _, n := range m.ml.Members() {
		peerAddr := string(n.Meta)
		if err := Bound(peerAddr, n.Addr, n.Port); err != nil {
			m.refuse(n.Name, peerAddr, err)
			continue
		}
		out = append(out, Member{ID: n.Name, Addr: peerAddr})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// ErrUnbound means a member advertises a peer address that is not its own.
var ErrUnbound = errors.New("membership: peer address is not where the member gossips from")

// Bound checks a peer address a member advertises against the address and
// port it gossips from: the same IP, and the gossip port its GossipAddr.
func Bound(peerAddr string, gossipIP net.IP, gossipPort uint16) error {
	host, _, err := net.SplitHostPort(peerAddr)
	if err != nil {
		return fmt.Errorf("%w: %q: %v", ErrUnbound, peerAddr, err)
	}
	ip := net.ParseIP(host)
	if ip == nil || !ip.Equal(gossipIP) {
		return fmt.Errorf("%w: peer address %q, gossips from %s", ErrUnbound, peerAddr, gossipIP)
	}
	g, err := GossipAddr(peerAddr)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrUnbound, err)
	}
	if _, port, _ := net.SplitHostPort(g); port != strconv.Itoa(int(gossipPort)) {
		return fmt.Errorf("%w: peer address %q, gossips from port %d", ErrUnbound, peerAddr, gossipPort)
	}
	return nil
}

// refuse logs a member left out once per id and address.
func (m *Membership) refuse(id, addr string, err error) {
	key := id + "\x00" + addr
	m.refusedMu.Lock()
	_, seen := m.refused[key]
	if !seen {
		if len(m.refused) >= maxRefused {
			clear(m.refused)
		}
		m.refused[key] = struct{}{}
	}
	m.refusedMu.Unlock()
	if !seen {
		m.log.Warn("ignoring a member whose peer address is not its own", "node", id, "err", err)
	}
}

// maxRefused bounds the refusals remembered for logging once.
const maxRefused = 1024

// Self is this node's id.
func (m *Membership) Self() string { return m.opts.NodeID }

// Close leaves the cluster and stops gossip.
func (m *Membership) Close() error {
	return errors.Join(m.Leave(), m.ml.Shutdown())
}

// Leave tells the cluster this node is leaving, so peers stop choosing it,
// and stops rejoining; the node still knows the others until Close. Later
// calls do nothing.
func (m *Membership) Leave() error {
	var err error
	m.leaveOnce.Do(func() {
		m.cancel()
		m.wg.Wait()
		err = m.ml.Leave(2 * time.Second)
	})
	return err
}

// logWriter sends memberlist's log lines to slog: errors as warnings, the
// rest (its warnings too: a member's routine suspicion) at debug level.
type logWriter struct{ l *slog.Logger }

func (w *logWriter) Write(b []byte) (int, error) {
	s := strings.TrimSpace(string(b))
	if strings.Contains(s, "[ERR]") {
		w.l.Warn(s)
	} else {
		w.l.Debug(s)
	}
	return len(b), nil
}

var _ io.Writer = (*logWriter)(nil)

// At is the id of the live member whose peer address is addr, "" when none
// (or m is nil). Members' peer addresses are distinct: each is bound to the
// address its member gossips from.
func (m *Membership) At(addr string) string {
	if m == nil {
		return ""
	}
	for _, mb := range m.Members() {
		if mb.Addr == addr {
			return mb.ID
		}
	}
	return ""
}
