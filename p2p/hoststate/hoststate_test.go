package hoststate

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/registry-proxy/registry-proxy/internal/pace"
)

type fakeCounters struct {
	rx, tx, disk, free, speed uint64
	err                       error
}

func (f *fakeCounters) Net(context.Context) (uint64, uint64, error) { return f.rx, f.tx, f.err }
func (f *fakeCounters) LinkSpeed(context.Context) (uint64, error)   { return f.speed, nil }
func (f *fakeCounters) DiskRead(context.Context) (uint64, error)    { return f.disk, nil }
func (f *fakeCounters) Free(context.Context) (uint64, error)        { return f.free, nil }

func TestSampleRates(t *testing.T) {
	now := time.Unix(100, 0)
	c := &fakeCounters{speed: 125_000_000, free: 7}
	tests := []struct {
		name                 string
		opts                 Options
		wantMaxTx, wantMaxRx uint64
	}{
		{"link speed", Options{}, 125_000_000, 125_000_000},
		{"configured", Options{MaxTxBps: 10, MaxRxBps: 20}, 10, 20},
		{"upload rate caps tx", Options{UploadRate: 1000}, 1000, 125_000_000},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			*c = fakeCounters{speed: 125_000_000, free: 7}
			tt.opts.Counters = c
			tt.opts.Now = func() time.Time { return now }
			m := New(tt.opts)
			st, err := m.Sample(context.Background())
			if err != nil || st.TxBps != 0 || st.RxBps != 0 {
				t.Fatalf("first sample: %+v %v", st, err)
			}
			c.rx, c.tx, c.disk = 3000, 1500, 600
			now = now.Add(3 * time.Second)
			st, _ = m.Sample(context.Background())
			if st.RxBps != 1000 || st.TxBps != 500 || st.DiskReadBps != 200 || st.FreeBytes != 7 {
				t.Fatalf("rates %+v", st)
			}
			if st.MaxTxBps != tt.wantMaxTx || st.MaxRxBps != tt.wantMaxRx {
				t.Fatalf("max %d/%d, want %d/%d", st.MaxTxBps, st.MaxRxBps, tt.wantMaxTx, tt.wantMaxRx)
			}
			// A counter reset gives 0, not a huge rate.
			c.rx = 10
			now = now.Add(time.Second)
			if st, _ = m.Sample(context.Background()); st.RxBps != 0 {
				t.Fatalf("after reset RxBps %d", st.RxBps)
			}
		})
	}
}

func TestSampleError(t *testing.T) {
	m := New(Options{Counters: &fakeCounters{err: errors.New("boom")}})
	if _, err := m.Sample(context.Background()); err == nil {
		t.Fatal("no error")
	}
}

func TestUploads(t *testing.T) {
	m := New(Options{Counters: &fakeCounters{}, UploadLimit: 2})
	d1, err := m.BeginUpload()
	if err != nil {
		t.Fatal(err)
	}
	d2, _ := m.BeginUpload()
	if _, err := m.BeginUpload(); !errors.Is(err, ErrBusy) {
		t.Fatalf("third upload: %v", err)
	}
	if got := m.State().UploadsInFlight; got != 2 {
		t.Fatalf("in flight %d", got)
	}
	d1()
	d1() // idempotent
	d2()
	if got := m.State().UploadsInFlight; got != 0 {
		t.Fatalf("in flight %d after done", got)
	}
}

func TestSysCounters(t *testing.T) {
	root := t.TempDir()
	write := func(p, s string) {
		os.MkdirAll(filepath.Dir(filepath.Join(root, p)), 0o755)
		os.WriteFile(filepath.Join(root, p), []byte(s), 0o644)
	}
	write("/proc/net/route", "Iface\tDestination\tGateway\nlo\t0000007F\t00000000\neth7\t00000000\t0102A8C0\n")
	write("/sys/class/net/eth7/statistics/rx_bytes", "1234\n")
	write("/sys/class/net/eth7/statistics/tx_bytes", "99\n")
	write("/sys/class/net/eth7/speed", "1000\n")
	c := SysCounters{Root: root, DataDir: t.TempDir()}
	rx, tx, err := c.Net(context.Background())
	if err != nil || rx != 1234 || tx != 99 {
		t.Fatalf("Net = %d %d %v", rx, tx, err)
	}
	if s, _ := c.LinkSpeed(context.Background()); s != 125_000_000 {
		t.Fatalf("LinkSpeed = %d", s)
	}
	if f, err := c.Free(context.Background()); err != nil || f == 0 {
		t.Fatalf("Free = %d %v", f, err)
	}
	if _, err := c.DiskRead(context.Background()); err != nil {
		t.Fatal(err)
	}
	write("/sys/class/net/eth7/speed", "-1\n")
	if s, _ := c.LinkSpeed(context.Background()); s != 0 {
		t.Fatalf("virtual link speed = %d", s)
	}
}

func TestSetUpload(t *testing.T) {
	m := New(Options{Counters: &fakeCounters{}, UploadLimit: 1})
	if m.Upload().Rate() != 0 {
		t.Fatal("an upload rate without one set")
	}
	done, err := m.BeginUpload()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.BeginUpload(); !errors.Is(err, ErrBusy) {
		t.Fatalf("second upload at limit 1: %v", err)
	}
	m.SetUpload(2, 1<<20)
	if _, err := m.BeginUpload(); err != nil {
		t.Fatalf("second upload at limit 2: %v", err)
	}
	done()
	if r := m.Upload().Rate(); r != 1<<20 {
		t.Fatalf("upload rate after SetUpload: %d", r)
	}
	st, _ := m.Sample(context.Background())
	if st.UploadLimit != 2 || st.UploadRateLimit != 1<<20 || st.MaxTxBps != 1<<20 {
		t.Errorf("state after SetUpload: %+v", st)
	}
	m.SetUpload(0, 0) // 0 keeps the slots, removes the rate
	if m.Upload().Rate() != 0 || m.State().UploadLimit != 2 {
		t.Errorf("after SetUpload(0, 0): rate %d, state %+v", m.Upload().Rate(), m.State())
	}
}

func TestDownloadRateReported(t *testing.T) {
	down := pace.New(0)
	m := New(Options{Counters: &fakeCounters{}, Download: down})
	if st, _ := m.Sample(context.Background()); st.DownloadRateLimit != 0 || st.MaxRxBps != 0 {
		t.Errorf("without a rate: %+v", st)
	}
	down.Set(3 << 20) // as a reload does
	if st, _ := m.Sample(context.Background()); st.DownloadRateLimit != 3<<20 || st.MaxRxBps != 3<<20 || st.Proto().GetDownloadRateLimit() != 3<<20 {
		t.Errorf("after the rate changed: %+v", st)
	}
}
