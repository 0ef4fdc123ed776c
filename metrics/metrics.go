// Package metrics holds registry-proxy's Prometheus metrics, one registry per
// node (no package state, so many nodes can run in one test process). Every
// method is safe on a nil *Metrics, which records nothing: components take
// one optionally. docs/metrics.md says what each metric means.
package metrics

import (
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

const ns = "registry_proxy"

// Sources of a blob's bytes.
const (
	SourceCache      = "cache"
	SourceContainerd = "containerd"
	SourcePeer       = "peer"
	SourceUpstream   = "upstream"
)

// A HELP text ends with the values of each label that takes a fixed set of
// them, as "[label: v1, v2]"; docs/metrics.md lists the same (a test holds
// the two together).

// Metrics is one node's metrics.
type Metrics struct {
	reg *prometheus.Registry

	blobBytes    *prometheus.CounterVec
	uploadBytes  prometheus.Counter
	uploads      *prometheus.CounterVec
	pieces       *prometheus.CounterVec
	pieceSeconds *prometheus.HistogramVec
	blobs        *prometheus.CounterVec
	blobSeconds  *prometheus.HistogramVec
	requests     *prometheus.CounterVec
	upstream     *prometheus.CounterVec
	accessChecks *prometheus.CounterVec
	refusals     *prometheus.CounterVec
	credRuns     *prometheus.CounterVec
	manifests    *prometheus.CounterVec
	stale        *prometheus.CounterVec
	gcRuns       prometheus.Counter
	gcRemoved    *prometheus.CounterVec
	gcFreed      prometheus.Counter
	peerRefused  *prometheus.CounterVec
}

// New returns the metrics of a node running version.
func New(version string) *Metrics {
	m := &Metrics{reg: prometheus.NewRegistry()}
	m.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	f := factory{m.reg}
	build := f.gaugeVec("build_info", "Always 1; the version label is the running build.", "version")
	build.WithLabelValues(version).Set(1)
	m.blobBytes = f.counterVec("blob_bytes_total",
		"Bytes of blobs by where they came from: cache and containerd (served to clients from the store and from containerd's content store), peer and upstream (pieces downloaded into the node). [source: cache, containerd, peer, upstream]", "source")
	m.uploadBytes = f.counter("peer_upload_bytes_total", "Bytes of pieces sent to peers.")
	m.uploads = f.counterVec("peer_uploads_total", "Piece requests from peers, by result: busy (upload slots full), absent (a piece this node does not have), conflict (already sent elsewhere). [result: ok, busy, absent, conflict, error]", "result")
	m.pieces = f.counterVec("pieces_total",
		"Piece fetches by parent kind and result: busy (the peer's upload slots were full), slow (below pieces.min_rate), raced (a client waited pieces.race_after: taken from the upstream), elsewhere (the peer sent it to another node first). [parent: peer, upstream] [result: ok, busy, slow, raced, elsewhere, cancelled, failed]", "parent", "result")
	m.pieceSeconds = f.histogramVec("piece_duration_seconds", "Time to fetch one piece that arrived, by parent kind. [parent: peer, upstream]",
		prometheus.ExponentialBuckets(0.01, 2, 14), "parent")
	m.blobs = f.counterVec("blob_downloads_total", "Blob downloads (tasks) ended, by result. [result: complete, stopped, failed]", "result")
	m.blobSeconds = f.histogramVec("blob_download_duration_seconds", "Duration of blob downloads, by result. [result: complete, stopped, failed]",
		prometheus.ExponentialBuckets(0.05, 2, 14), "result")
	m.requests = f.counterVec("http_requests_total", "Mirror requests by kind, method (one outside the registry API's counts as other) and status code. [kind: base, manifest, blob, other] [method: GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, other]", "kind", "method", "code")
	m.upstream = f.counterVec("upstream_requests_total", "Requests to upstream registries by host (a configured or allowed name, or other), method and status code (error: no answer).", "host", "method", "code")
	m.accessChecks = f.counterVec("access_checks_total",
		"Access checks of a client against the upstream, by result: cached_* (answered within access.ttl), stale_allowed (upstream unreachable, allowed before), public_allowed (upstream unreachable, the repository public within access.public_ttl), error (could not be asked). [result: allowed, refused, cached_allowed, cached_refused, stale_allowed, public_allowed, error]", "result")
	m.refusals = f.counterVec("private_refusals_total",
		"Requests for private content the mirror refused (the client then pulls from the registry itself), by access mode and reason: no_credentials (an anonymous client, client mode), refused (the registry refused the client's or, in node mode, the node's credentials), error (the registry could not be asked). [mode: client, node] [reason: no_credentials, refused, error]", "mode", "reason")
	m.credRuns = f.counterVec("credential_provider_runs_total",
		"Runs of kubelet credential provider plugins, by provider (its name in the CredentialProviderConfig) and result: failed (exit status or bad answer). [result: ok, failed, timeout]", "provider", "result")
	m.manifests = f.counterVec("manifests_total",
		"Manifests served to clients by digest, by where this node got them: cache (its store), peer (a member), upstream (the registry: as the digest's owner with this node's credentials, or with the client's where the owner could not). [source: cache, peer, upstream]", "source")
	m.stale = f.counterVec("stale_answers_total",
		"Answers from what the cluster holds while the registry could not answer, by kind (tag: a tag resolved to the cluster's last resolution) and reason: unavailable (no connection, reset, timeout), server_error (5xx), throttled (429). [kind: tag] [reason: unavailable, server_error, throttled]", "kind", "reason")
	m.gcRuns = f.counter("store_gc_runs_total", "Garbage collections of the blob store.")
	m.gcRemoved = f.counterVec("store_gc_removed_total", "Items garbage collection removed, by kind. [kind: blob, partial, manifest]", "kind")
	m.gcFreed = f.counter("store_gc_freed_bytes_total", "Bytes of blobs garbage collection removed.")
	m.peerRefused = f.counterVec("peer_calls_refused_total",
		"Register and Announce calls from members refused by a bound, by call and reason: not_owner (this node does not rank for the digest), rate (calls or new registrations per member), full (tracker entries per member or in all), upstream (owner downloads started or failed for the member). [call: register, announce] [reason: not_owner, rate, full, upstream]", "call", "reason")
	return m
}

type factory struct{ reg prometheus.Registerer }

func (f factory) counter(name, help string) prometheus.Counter {
	c := prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Name: name, Help: help})
	f.reg.MustRegister(c)
	return c
}

func (f factory) counterVec(name, help string, labels ...string) *prometheus.CounterVec {
	c := prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: name, Help: help}, labels)
	f.reg.MustRegister(c)
	return c
}

func (f factory) gaugeVec(name, help string, labels ...string) *prometheus.GaugeVec {
	g := prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Name: name, Help: help}, labels)
	f.reg.MustRegister(g)
	return g
}

func (f factory) histogramVec(name, help string, buckets []float64, labels ...string) *prometheus.HistogramVec {
	h := prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: ns, Name: name, Help: help, Buckets: buckets}, labels)
	f.reg.MustRegister(h)
	return h
}

// Handler serves the metrics in Prometheus' text format.
func (m *Metrics) Handler() http.Handler {
	if m == nil {
		return http.NotFoundHandler()
	}
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
}

// Gatherer returns the registry, for tests and the demo; nil on nil.
func (m *Metrics) Gatherer() prometheus.Gatherer {
	if m == nil {
		return nil
	}
	return m.reg
}

// Families lists the name of every metric family registered, sorted, those
// with no series yet included: a vector nothing has been counted in is not
// in a scrape, but a dashboard or an alert may rightly use it. Tests hold the
// dashboard and docs/metrics.md to this list.
func (m *Metrics) Families() ([]string, error) {
	if m == nil {
		return nil, nil
	}
	ch := make(chan *prometheus.Desc)
	go func() {
		m.reg.Describe(ch)
		close(ch)
	}()
	var names []string
	var err error
	for d := range ch {
		// A Desc shows its name only in its String(),
		// `Desc{fqName: "name", help: ...}`.
		s, ok := strings.CutPrefix(d.String(), "Desc{fqName: ")
		q, qerr := strconv.QuotedPrefix(s)
		if !ok || qerr != nil {
			err = fmt.Errorf("metrics: no name in %s", d)
			continue
		}
		name, _ := strconv.Unquote(q)
		if !slices.Contains(names, name) {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	return names, err
}

// GaugeFunc registers a gauge read from f at each scrape: values that a
// component already keeps (tasks in flight, store bytes).
func (m *Metrics) GaugeFunc(name, help string, f func() float64) {
	if m == nil {
		return
	}
	m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: ns, Name: name, Help: help}, f))
}

// ParentWeights registers the gauge of each followed parent's weight, read
// from f at each scrape.
func (m *Metrics) ParentWeights(f func() map[string]float64) {
	if m == nil {
		return
	}
	m.reg.MustRegister(&weightCollector{
		desc: prometheus.NewDesc(ns+"_parent_weight", "The weight this node gives each followed parent from its latest host state (bytes/s it expects the parent to send).", []string{"parent"}, nil),
		f:    f,
	})
}

type weightCollector struct {
	desc *prometheus.Desc
	f    func() map[string]float64
}

func (c *weightCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c *weightCollector) Collect(ch chan<- prometheus.Metric) {
	for id, w := range c.f() {
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, w, id)
	}
}

// BlobBytes counts n bytes of a blob from source.
func (m *Metrics) BlobBytes(source string, n int64) {
	if m == nil || n <= 0 {
		return
	}
	m.blobBytes.WithLabelValues(source).Add(float64(n))
}

// Upload counts one piece request from a peer and the bytes sent.
func (m *Metrics) Upload(result string, n int64) {
	if m == nil {
		return
	}
	m.uploads.WithLabelValues(result).Inc()
	if n > 0 {
		m.uploadBytes.Add(float64(n))
	}
}

// Piece counts one piece fetch; took is observed for pieces that arrived.
func (m *Metrics) Piece(parent, result string, took time.Duration) {
	if m == nil {
		return
	}
	m.pieces.WithLabelValues(parent, result).Inc()
	if result == "ok" {
		m.pieceSeconds.WithLabelValues(parent).Observe(took.Seconds())
	}
}

// Blob counts one ended download.
func (m *Metrics) Blob(result string, took time.Duration) {
	if m == nil {
		return
	}
	m.blobs.WithLabelValues(result).Inc()
	m.blobSeconds.WithLabelValues(result).Observe(took.Seconds())
}

// Request counts one mirror request. The method is a client's word: any
// but the registry API's own counts as "other", so labels stay few.
func (m *Metrics) Request(kind, method string, code int) {
	if m == nil {
		return
	}
	switch method {
	case http.MethodGet, http.MethodHead, http.MethodPost, http.MethodPut, http.MethodPatch, http.MethodDelete, http.MethodOptions:
	default:
		method = "other"
	}
	if code < -1 || code > 999 {
		code = 0
	}
	m.requests.WithLabelValues(kind, method, strconv.Itoa(code)).Inc()
}

// Upstream counts one request to an upstream host; code 0 is no answer.
func (m *Metrics) Upstream(host, method string, code int) {
	if m == nil {
		return
	}
	c := "error"
	if code > 0 {
		c = strconv.Itoa(code)
	}
	m.upstream.WithLabelValues(host, method, c).Inc()
}

// AccessCheck counts one access check.
func (m *Metrics) AccessCheck(result string) {
	if m == nil {
		return
	}
	m.accessChecks.WithLabelValues(result).Inc()
}

// PrivateRefused counts one request for private content refused.
func (m *Metrics) PrivateRefused(mode, reason string) {
	if m == nil {
		return
	}
	m.refusals.WithLabelValues(mode, reason).Inc()
}

// CredentialProviderRun counts one run of a credential provider plugin;
// provider is its configured name (a bounded set).
func (m *Metrics) CredentialProviderRun(provider, result string) {
	if m == nil {
		return
	}
	m.credRuns.WithLabelValues(provider, result).Inc()
}

// ManifestServed counts one manifest served by digest from source.
func (m *Metrics) ManifestServed(source string) {
	if m == nil {
		return
	}
	m.manifests.WithLabelValues(source).Inc()
}

// StaleAnswer counts one answer from the cluster's last resolution.
func (m *Metrics) StaleAnswer(kind, reason string) {
	if m == nil {
		return
	}
	m.stale.WithLabelValues(kind, reason).Inc()
}

// GC counts one garbage collection.
func (m *Metrics) GC(blobs, partials, manifests int, freed int64) {
	if m == nil {
		return
	}
	m.gcRuns.Inc()
	m.gcRemoved.WithLabelValues("blob").Add(float64(blobs))
	m.gcRemoved.WithLabelValues("partial").Add(float64(partials))
	m.gcRemoved.WithLabelValues("manifest").Add(float64(manifests))
	m.gcFreed.Add(float64(freed))
}

// PeerCallRefused counts one Register or Announce refused by a bound; call
// and reason are from fixed sets (swarm.ServerOptions.Refused).
func (m *Metrics) PeerCallRefused(call, reason string) {
	if m == nil {
		return
	}
	m.peerRefused.WithLabelValues(call, reason).Inc()
}
