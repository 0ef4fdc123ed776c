// Package hoststate measures this host for its children: network tx and rx
// rates against their maxima, uploads in flight against the upload limit,
// disk read bandwidth and free space. Rates come from counters read over short
// windows, never from probe traffic. The counters and the clock are injected.
package hoststate

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/registry-proxy/registry-proxy/internal/pace"
	"github.com/registry-proxy/registry-proxy/p2p/pb"
)

// Counters reads raw, cumulative counters of the host.
type Counters interface {
	// Net returns bytes received and sent so far on the peer interface.
	Net(ctx context.Context) (rx, tx uint64, err error)
	// LinkSpeed returns the interface speed in bytes/s, 0 when unknown.
	LinkSpeed(ctx context.Context) (uint64, error)
	// DiskRead returns bytes read so far from the data directory's device.
	DiskRead(ctx context.Context) (uint64, error)
	// Free returns the bytes free for the data directory.
	Free(ctx context.Context) (uint64, error)
}

// State is one measurement.
type State struct {
	TxBps, RxBps       uint64 // bytes/s over the last window
	MaxTxBps, MaxRxBps uint64 // configured, else link speed; 0 unknown
	UploadsInFlight    uint32
	UploadLimit        uint32 // concurrent piece uploads allowed
	UploadRateLimit    uint64 // token bucket bytes/s, 0 none
	DownloadRateLimit  uint64 // download.rate bytes/s, 0 none
	DiskReadBps        uint64
	FreeBytes          uint64
	MeasuredAt         time.Time
}

// Proto is the state as sent to children over SyncHost.
func (s State) Proto() *pb.HostState {
	return &pb.HostState{
		TxBandwidth: s.TxBps, RxBandwidth: s.RxBps, MaxTxBandwidth: s.MaxTxBps, MaxRxBandwidth: s.MaxRxBps,
		UploadsInFlight: s.UploadsInFlight, UploadLimit: s.UploadLimit, UploadRateLimit: s.UploadRateLimit, DownloadRateLimit: s.DownloadRateLimit,
		DiskReadBandwidth: s.DiskReadBps, FreeBytes: s.FreeBytes, MeasuredAt: s.MeasuredAt.UnixNano(),
	}
}

// Options configure a Meter.
type Options struct {
	Counters Counters
	// Now is the clock; time.Now when nil.
	Now func() time.Time
	// MaxTxBps and MaxRxBps override the link speed (bytes/s).
	MaxTxBps, MaxRxBps uint64
	// UploadLimit is how many pieces may upload at once; 0 means 16.
	UploadLimit int
	// UploadRate limits upload bytes/s with a token bucket; 0 means none.
	// When set it is the reported maximum tx.
	UploadRate uint64
	// Download is the node's download limit (download.rate), read at each
	// sample; nil means none. When set it is the reported maximum rx.
	Download *pace.Limiter
}

// ErrBusy means the host is at its upload limit.
var ErrBusy = errors.New("hoststate: upload limit reached")

// Meter keeps the latest State and counts uploads.
type Meter struct {
	opts    Options
	upload  *pace.Limiter
	uploads atomic.Int32
	// The upload slots, changed by SetUpload while running.
	uploadLimit atomic.Int32

	mu       sync.Mutex
	prevAt   time.Time
	prevRx   uint64
	prevTx   uint64
	prevDisk uint64
	state    State
}

// New returns a meter; call Sample (or Run) to measure.
func New(opts Options) *Meter {
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.UploadLimit <= 0 {
		opts.UploadLimit = 16
	}
	m := &Meter{opts: opts, upload: pace.New(0)}
	m.SetUpload(opts.UploadLimit, opts.UploadRate)
	return m
}

// SetUpload changes the upload slots (0 keeps them) and the upload rate in
// bytes/s (0: none) of a running meter.
func (m *Meter) SetUpload(limit int, bps uint64) {
	if limit > 0 {
		m.uploadLimit.Store(int32(limit))
	}
	m.upload.Set(bps)
}

// Upload paces uploads to peers (upload.rate).
func (m *Meter) Upload() *pace.Limiter { return m.upload }

// BeginUpload counts one upload in flight; call done when it ends. It fails
// with ErrBusy at the upload limit.
func (m *Meter) BeginUpload() (done func(), err error) {
	if n := m.uploads.Add(1); n > m.uploadLimit.Load() {
		m.uploads.Add(-1)
		return nil, ErrBusy
	}
	var once sync.Once
	return func() { once.Do(func() { m.uploads.Add(-1) }) }, nil
}

// Uploads is the number of uploads in flight now.
func (m *Meter) Uploads() int { return int(max(m.uploads.Load(), 0)) }

// Sample reads the counters and computes rates since the previous sample.
// The first sample has zero rates.
func (m *Meter) Sample(ctx context.Context) (State, error) {
	c := m.opts.Counters
	var errs []error
	rx, tx, err := c.Net(ctx)
	errs = append(errs, err)
	speed, err := c.LinkSpeed(ctx)
	errs = append(errs, err)
	disk, err := c.DiskRead(ctx)
	errs = append(errs, err)
	free, err := c.Free(ctx)
	errs = append(errs, err)
	now := m.opts.Now()

	m.mu.Lock()
	defer m.mu.Unlock()
	st := State{
		MaxTxBps:          pick(m.opts.MaxTxBps, speed),
		MaxRxBps:          pick(m.opts.MaxRxBps, speed),
		UploadsInFlight:   uint32(max(m.uploads.Load(), 0)),
		UploadLimit:       uint32(m.uploadLimit.Load()),
		UploadRateLimit:   m.upload.Rate(),
		DownloadRateLimit: m.opts.Download.Rate(),
		FreeBytes:         free,
		MeasuredAt:        now,
	}
	if r := st.UploadRateLimit; r > 0 && (st.MaxTxBps == 0 || r < st.MaxTxBps) {
		st.MaxTxBps = r
	}
	if r := st.DownloadRateLimit; r > 0 && (st.MaxRxBps == 0 || r < st.MaxRxBps) {
		st.MaxRxBps = r
	}
	if dt := now.Sub(m.prevAt).Seconds(); !m.prevAt.IsZero() && dt > 0 {
		st.RxBps = perSecond(m.prevRx, rx, dt)
		st.TxBps = perSecond(m.prevTx, tx, dt)
		st.DiskReadBps = perSecond(m.prevDisk, disk, dt)
	}
	m.prevAt, m.prevRx, m.prevTx, m.prevDisk = now, rx, tx, disk
	m.state = st
	if err := errors.Join(errs...); err != nil {
		return st, fmt.Errorf("hoststate: %w", err)
	}
	return st, nil
}

// State returns the latest sample, with uploads in flight as of now.
func (m *Meter) State() State {
	m.mu.Lock()
	defer m.mu.Unlock()
	st := m.state
	st.UploadsInFlight = uint32(max(m.uploads.Load(), 0))
	return st
}

// Run samples every interval until ctx ends, reporting errors to onErr
// (which may be nil).
func (m *Meter) Run(ctx context.Context, interval time.Duration, onErr func(error)) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		if _, err := m.Sample(ctx); err != nil && onErr != nil {
			onErr(err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func pick(configured, measured uint64) uint64 {
	if configured > 0 {
		return configured
	}
	return measured
}

// perSecond is the rate between two counter readings; a counter that went
// backwards (interface reset) gives 0.
func perSecond(prev, cur uint64, dt float64) uint64 {
	if cur < prev {
		return 0
	}
	return uint64(float64(cur-prev) / dt)
}
