package pace

import (
	"bytes"
	"context"
	"io"
	"testing"
	"testing/synctest"
	"time"
)

func TestPace(t *testing.T) {
	for _, tc := range []struct {
		name  string
		bps   uint64
		size  int
		least time.Duration // the bucket starts full (4 MiB)
	}{
		{"unlimited", 0, 16 << 20, 0},
		{"1 MiB/s, 8 MiB", 1 << 20, 8 << 20, 4 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				l := New(tc.bps)
				start := time.Now()
				n, err := io.Copy(io.Discard, l.Reader(context.Background(), bytes.NewReader(make([]byte, tc.size))))
				if err != nil || n != int64(tc.size) {
					t.Fatalf("read %d, %v", n, err)
				}
				if took := time.Since(start); took < tc.least || (tc.bps == 0 && took > 0) {
					t.Errorf("read %d bytes in %v at %d bytes/s", tc.size, took, tc.bps)
				}
				start = time.Now()
				if _, err := l.Writer(context.Background(), io.Discard).Write(make([]byte, tc.size)); err != nil {
					t.Fatal(err)
				}
				if took := time.Since(start); tc.bps > 0 && took < time.Duration(float64(tc.size)/float64(tc.bps)*float64(time.Second))-time.Second {
					t.Errorf("wrote %d bytes in %v at %d bytes/s", tc.size, took, tc.bps)
				}
			})
		})
	}
}

func TestSetWhileRunning(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := New(1 << 20)
		if l.Rate() != 1<<20 {
			t.Fatalf("rate %d", l.Rate())
		}
		l.Set(0)
		start := time.Now()
		io.Copy(io.Discard, l.Reader(context.Background(), bytes.NewReader(make([]byte, 64<<20))))
		if time.Since(start) != 0 || l.Rate() != 0 {
			t.Errorf("after Set(0): %v, rate %d", time.Since(start), l.Rate())
		}
		var nilL *Limiter
		if nilL.Rate() != 0 || nilL.Reader(context.Background(), bytes.NewReader(nil)) == nil {
			t.Error("a nil limiter")
		}
	})
}

func TestCancelled(t *testing.T) {
	l := New(1)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := io.Copy(io.Discard, l.Reader(ctx, bytes.NewReader(make([]byte, 8<<20)))); err == nil {
		t.Error("a cancelled read at 1 byte/s returned no error")
	}
}

// A small bucket paces from the first byte, in steps it can hold.
func TestSmallBurst(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := NewBurst(4096, 1024)
		start := time.Now()
		if _, err := l.Writer(context.Background(), io.Discard).Write(make([]byte, 8192)); err != nil {
			t.Fatal(err)
		}
		if took := time.Since(start); took < 1750*time.Millisecond {
			t.Errorf("8 KiB at 4 KiB/s with a 1 KiB bucket took %v", took)
		}
		start = time.Now()
		if _, err := io.Copy(io.Discard, l.Reader(context.Background(), bytes.NewReader(make([]byte, 8192)))); err != nil {
			t.Fatal(err)
		}
		if took := time.Since(start); took < 1750*time.Millisecond {
			t.Errorf("reading 8 KiB at 4 KiB/s with a 1 KiB bucket took %v", took)
		}
	})
}
