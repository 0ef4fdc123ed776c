// Package transfer is the client side of the peer protocol: pooled gRPC
// connections for control, and pooled keep-alive HTTP connections for piece
// bytes.
package transfer

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/registry-proxy/registry-proxy/internal/drain"
	"github.com/registry-proxy/registry-proxy/p2p/collector"
	"github.com/registry-proxy/registry-proxy/p2p/pb"
	"github.com/registry-proxy/registry-proxy/p2p/peer"
	"github.com/registry-proxy/registry-proxy/p2p/trust"
)

// Options configure a Pool.
type Options struct {
	// DialContext dials peers; a net.Dialer when nil.
	DialContext func(ctx context.Context, network, addr string) (net.Conn, error)
	// TLS authenticates this node to its peers and them to it (the
	// cluster's mutual TLS); nil speaks plaintext (p2p.insecure).
	TLS *tls.Config
	// NodeID is this node's id, sent with piece requests (trust.NodeHeader):
	// on an insecure peer port the only id there is.
	NodeID string
	// MemberAt names the member whose peer address addr is: with TLS, a
	// node dialled there must present a certificate naming it, checked at
	// every handshake. Nil checks only the chain (tools that dial one node
	// by address).
	MemberAt func(addr string) string
}

// Pool holds connections to peers.
type Pool struct {
	dial   func(ctx context.Context, network, addr string) (net.Conn, error)
	http   *http.Client
	tls    *tls.Config
	scheme string
	nodeID string
	// memberAt is Options.MemberAt.
	memberAt func(addr string) string

	mu    sync.Mutex
	conns map[string]*grpc.ClientConn
	// probes are the peer addresses asked whether they answer (Answered).
	probes map[string]*probe
}

// NewPool returns a pool; Close releases it.
func NewPool(opts Options) *Pool {
	dial := opts.DialContext
	if dial == nil {
		dial = (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext
	}
	scheme := "http"
	var httpTLS *tls.Config
	if opts.TLS != nil {
		scheme = "https"
		// HTTP/1.1 for piece bytes: one connection per piece in flight.
		httpTLS = opts.TLS.Clone()
		httpTLS.NextProtos = []string{"http/1.1"}
	}
	return &Pool{
		dial:     dial,
		tls:      opts.TLS,
		scheme:   scheme,
		nodeID:   opts.NodeID,
		memberAt: opts.MemberAt,
		probes:   map[string]*probe{},
		http: &http.Client{Transport: &http.Transport{
			DialContext:           dial,
			DialTLSContext:        tlsDialer(dial, httpTLS),
			TLSClientConfig:       httpTLS,
			TLSHandshakeTimeout:   tlsHandshakeTimeout,
			MaxIdleConnsPerHost:   16,
			IdleConnTimeout:       90 * time.Second,
			ResponseHeaderTimeout: 10 * time.Second,
			DisableCompression:    true,
		}},
		conns: map[string]*grpc.ClientConn{},
	}
}

// tlsReadBuffer is how much of a peer's TLS stream one read from the
// socket may take. crypto/tls reads a record (at most 16 KiB) at a time;
// without a buffer beneath it, a piece costs a read system call per record,
// which on a busy node is a good part of what TLS costs over plaintext.
const tlsReadBuffer = 256 << 10

const tlsHandshakeTimeout = 5 * time.Second

// tlsDialer dials piece connections with TLS over a buffered reader; nil
// without TLS.
func tlsDialer(dial func(ctx context.Context, network, addr string) (net.Conn, error), cfg *tls.Config) func(ctx context.Context, network, addr string) (net.Conn, error) {
	if cfg == nil {
		return nil
	}
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		raw, err := dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		c := cfg.Clone()
		if c.ServerName == "" {
			if host, _, err := net.SplitHostPort(addr); err == nil {
				c.ServerName = host
			}
		}
		tc := tls.Client(&bufferedConn{Conn: raw, r: bufio.NewReaderSize(raw, tlsReadBuffer)}, c)
		// As the transport's TLSHandshakeTimeout, which a DialTLSContext
		// replaces.
		hctx, cancel := context.WithTimeout(ctx, tlsHandshakeTimeout)
		defer cancel()
		if err := tc.HandshakeContext(hctx); err != nil {
			raw.Close()
			return nil, err
		}
		return tc, nil
	}
}

// bufferedConn is a connection read through a buffer.
type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *bufferedConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// Close closes every connection.
func (p *Pool) Close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = map[string]*grpc.ClientConn{}
	p.http.CloseIdleConnections()
}

// Conn returns the (shared) gRPC connection to a peer address.
func (p *Pool) Conn(addr string) (*grpc.ClientConn, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if c, ok := p.conns[addr]; ok {
		return c, nil
	}
	creds := insecure.NewCredentials()
	if p.tls != nil {
		cfg := p.tls.Clone()
		if p.memberAt != nil {
			cfg.VerifyConnection = trust.VerifyName(func() string { return p.memberAt(addr) })
		}
		creds = credentials.NewTLS(cfg)
	}
	c, err := grpc.NewClient("passthrough:///"+addr,
		grpc.WithTransportCredentials(creds),
		grpc.WithContextDialer(func(ctx context.Context, a string) (net.Conn, error) { return p.dial(ctx, "tcp", a) }))
	if err != nil {
		return nil, fmt.Errorf("transfer: dial %s: %w", addr, err)
	}
	p.conns[addr] = c
	return c, nil
}

// HostSyncDial is the statesync.Dial over this pool.
func (p *Pool) HostSyncDial(_ context.Context, addr string) (pb.HostSyncClient, func(), error) {
	c, err := p.Conn(addr)
	if err != nil {
		return nil, nil, err
	}
	return pb.NewHostSyncClient(c), func() {}, nil
}

// Register asks a digest's owner for the nodes that have its pieces.
func (p *Pool) Register(ctx context.Context, addr string, req *pb.RegisterRequest) (*pb.RegisterResponse, error) {
	c, err := p.Conn(addr)
	if err != nil {
		return nil, err
	}
	return pb.NewTrackerClient(c).Register(ctx, req)
}

// Watch follows a peer's pieces of d, calling fn with each update, until the
// stream ends; it returns nil when the peer said the blob is complete.
func (p *Pool) Watch(ctx context.Context, addr string, d digest.Digest, self string, fn func(*pb.PieceUpdate)) error {
	c, err := p.Conn(addr)
	if err != nil {
		return err
	}
	st, err := pb.NewPiecesClient(c).WatchPieces(ctx, &pb.WatchPiecesRequest{Digest: d.String(), HostId: self})
	if err != nil {
		return err
	}
	for {
		up, err := st.Recv()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		fn(up)
	}
}

// Parent returns a peer as a collector parent for blob d.
func (p *Pool) Parent(id, addr string, d digest.Digest) collector.Parent {
	return &peerParent{pool: p, id: id, addr: addr, digest: d}
}

type peerParent struct {
	pool     *Pool
	id, addr string
	digest   digest.Digest
}

func (pp *peerParent) ID() string { return pp.id }

func (pp *peerParent) Fetch(ctx context.Context, i int, _, n int64) (io.ReadCloser, error) {
	url := pp.pool.scheme + "://" + pp.addr + "/pieces/" + pp.digest.String() + "/" + strconv.Itoa(i)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	if pp.pool.nodeID != "" {
		req.Header.Set(trust.NodeHeader, pp.pool.nodeID)
	}
	resp, err := pp.pool.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("transfer: piece %d from %s: %w", i, pp.id, err)
	}
	if pp.pool.tls != nil {
		// The node at addr must be the member dialled, whatever member
		// named the address.
		if err := trust.VerifyName(func() string { return pp.id })(tlsState(resp)); err != nil {
			resp.Body.Close()
			return nil, fmt.Errorf("transfer: piece %d from %s: %w", i, pp.id, err)
		}
	}
	switch resp.StatusCode {
	case http.StatusOK:
	case http.StatusServiceUnavailable:
		// Busy parents refuse often: keep the connection.
		drain.Close(resp.Body)
		return nil, fmt.Errorf("transfer: piece %d from %s: %w", i, pp.id, collector.ErrBusy)
	case http.StatusConflict:
		drain.Close(resp.Body)
		ee := &collector.ElsewhereError{Offered: resp.Header.Get(peer.OfferedHeader)}
		return nil, fmt.Errorf("transfer: piece %d from %s: %w", i, pp.id, ee)
	default:
		drain.Close(resp.Body)
		return nil, fmt.Errorf("transfer: piece %d from %s: %s", i, pp.id, resp.Status)
	}
	if resp.ContentLength != n {
		resp.Body.Close()
		return nil, fmt.Errorf("transfer: piece %d from %s: %d bytes, want %d", i, pp.id, resp.ContentLength, n)
	}
	return resp.Body, nil
}

// Announce tells the owner at addr which of its digests this node holds.
func (p *Pool) Announce(ctx context.Context, addr string, req *pb.AnnounceRequest) error {
	c, err := p.Conn(addr)
	if err != nil {
		return err
	}
	_, err = pb.NewTrackerClient(c).Announce(ctx, req)
	return err
}

// Preheat has the node at addr fetch a blob, calling fn with its progress,
// until it is complete (nil) or fails.
func (p *Pool) Preheat(ctx context.Context, addr string, req *pb.PreheatRequest, fn func(*pb.PreheatProgress)) error {
	c, err := p.Conn(addr)
	if err != nil {
		return err
	}
	st, err := pb.NewTrackerClient(c).Preheat(ctx, req)
	if err != nil {
		return err
	}
	for {
		pr, err := st.Recv()
		if err == io.EOF {
			return errors.New("transfer: preheat stream ended before the blob was complete")
		}
		if err != nil {
			return err
		}
		fn(pr)
		if pr.GetComplete() {
			return nil
		}
	}
}

// maxManifestMsg bounds a manifest answer a peer sends: the largest manifest
// a node accepts (upstream.max_manifest_size is at most this) and framing.
const maxManifestMsg = 64<<20 + 4096

// GetManifest asks the node at addr for a manifest by digest.
func (p *Pool) GetManifest(ctx context.Context, addr string, req *pb.GetManifestRequest) (*pb.Manifest, error) {
	c, err := p.Conn(addr)
	if err != nil {
		return nil, err
	}
	return pb.NewManifestsClient(c).GetManifest(ctx, req, grpc.MaxCallRecvMsgSize(maxManifestMsg))
}

// PutTag records a tag's resolution at the node at addr, the tag's owner.
func (p *Pool) PutTag(ctx context.Context, addr string, rec *pb.TagRecord) error {
	c, err := p.Conn(addr)
	if err != nil {
		return err
	}
	_, err = pb.NewManifestsClient(c).PutTag(ctx, rec)
	return err
}

// GetTag asks the node at addr, the tag's owner, for a tag's resolution.
func (p *Pool) GetTag(ctx context.Context, addr string, req *pb.TagRequest) (*pb.TagRecord, error) {
	c, err := p.Conn(addr)
	if err != nil {
		return nil, err
	}
	return pb.NewManifestsClient(c).GetTag(ctx, req)
}

func tlsState(resp *http.Response) tls.ConnectionState {
	if resp.TLS == nil {
		return tls.ConnectionState{}
	}
	return *resp.TLS
}

// probe is one peer address asked whether it answers.
type probe struct {
	done     chan struct{} // closed when the first try ends
	answered bool          // under Pool.mu
	running  bool
	// slow: a wait for the first try timed out; nobody waits for it again.
	slow bool
	last time.Time
}

// Probe timings: a first probe is waited for at most firstProbeWait, a try
// lasts at most probeTimeout, one that failed is tried again after
// reprobeAfter.
const (
	firstProbeWait = 300 * time.Millisecond
	probeTimeout   = 2 * time.Second
	reprobeAfter   = 5 * time.Second
)

// Answered says, for each peer address, whether the node there has answered
// this one (a gRPC health check over the peer port, TLS and its name
// checked): a member whose port never answered is ranked as no owner.
// Addresses not known yet are probed in the background, and waited for
// together at most firstProbeWait; one that failed is probed again now and
// then.
func (p *Pool) Answered(addrs []string) []bool {
	var wait []*probe
	p.mu.Lock()
	now := time.Now()
	for _, a := range addrs {
		pr := p.probes[a]
		if pr == nil {
			pr = &probe{done: make(chan struct{})}
			p.probes[a] = pr
		}
		if pr.last.IsZero() && !pr.slow {
			wait = append(wait, pr)
		}
		if pr.answered || pr.running || (!pr.last.IsZero() && now.Sub(pr.last) < reprobeAfter) {
			continue
		}
		pr.running = true
		go p.probe(a, pr)
	}
	p.mu.Unlock()
	if len(wait) > 0 {
		t := time.NewTimer(firstProbeWait)
	waiting:
		for _, pr := range wait {
			select {
			case <-pr.done:
			case <-t.C:
				break waiting
			}
		}
		t.Stop()
		p.mu.Lock()
		for _, pr := range wait {
			if pr.last.IsZero() {
				pr.slow = true
			}
		}
		p.mu.Unlock()
	}
	out := make([]bool, len(addrs))
	p.mu.Lock()
	for i, a := range addrs {
		out[i] = p.probes[a] != nil && p.probes[a].answered
	}
	p.mu.Unlock()
	return out
}

func (p *Pool) probe(addr string, pr *probe) {
	ok := false
	if c, err := p.Conn(addr); err == nil {
		ctx, cancel := context.WithTimeout(context.Background(), probeTimeout)
		_, err = healthpb.NewHealthClient(c).Check(ctx, &healthpb.HealthCheckRequest{})
		cancel()
		ok = err == nil
	}
	p.mu.Lock()
	first := pr.last.IsZero()
	pr.running, pr.answered, pr.last = false, ok, time.Now()
	// Forget addresses no longer asked about, so the map follows the members.
	if len(p.probes) > maxProbes {
		for a, o := range p.probes {
			if !o.running && a != addr {
				delete(p.probes, a)
			}
		}
	}
	p.mu.Unlock()
	if first {
		close(pr.done)
	}
}

// maxProbes bounds the addresses remembered by Answered.
const maxProbes = 4096
