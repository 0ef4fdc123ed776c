//go:build linux

package blobstore

import (
	"bytes"
	"context"
	"crypto/rand"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/piece"
)

// reportedFile counts the KiB a VM's guest has handed back to its host
// (virtio-balloon free page reporting); absent where nothing is reported.
const reportedFile = "/sys/module/page_reporting/parameters/reported_kib"

// BenchmarkWritePiece writes a 256 MiB blob into a new partial blob, 4 MiB
// pieces from four writers as the collector does, and reports the process's
// CPU-seconds a GiB and MB/s, in two states of the machine's free memory:
//
//   - reused: a file of the same size was written and deleted just before,
//     so the page cache takes pages the kernel has just freed;
//   - returned: four times as much written and deleted, then wait until the
//     guest has reported the blob's size of memory to its host (only in a VM
//     with free page reporting), so the page cache takes pages the host must
//     back again at their first touch; skipped when the guest reports too
//     little within a minute.
//
// The difference is the machine's price of first-touched memory, which a
// proxy pays for every cold blob it stores and a client discarding the bytes
// does not (docs/benchmarks/notebook.md).
func BenchmarkWritePiece(b *testing.B) {
	const size, pieceSize = 256 << 20, 4 << 20
	for _, mode := range []string{"reused", "returned"} {
		b.Run(mode, func(b *testing.B) {
			if _, err := os.Stat(reportedFile); mode == "returned" && err != nil {
				b.Skipf("no free page reporting here: %v", err)
			}
			src := make([]byte, pieceSize)
			rand.Read(src)
			var cpu, wall time.Duration
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				dir := b.TempDir()
				if mode == "returned" {
					// The guest reports freed memory in batches: free
					// more than the blob takes, and wait for the blob's
					// worth of it to be reported.
					k0 := reportedKiB(b)
					freeJustNow(b, dir, 4*size)
					waitReported(b, k0, size)
				} else {
					freeJustNow(b, dir, size)
				}
				s, err := Open(context.Background(), filepath.Join(dir, "store"), Options{})
				if err != nil {
					b.Fatal(err)
				}
				d := digest.FromString(strconv.Itoa(i)) // never committed
				p, err := s.Ingest(context.Background(), d, piece.Plan{Size: size, PieceSize: pieceSize})
				if err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				c0, t0 := processCPU(b), time.Now()
				writeAll(b, p, src)
				cpu += processCPU(b) - c0
				wall += time.Since(t0)
				b.StopTimer()
				if err := p.Discard(); err != nil {
					b.Fatal(err)
				}
			}
			gib := float64(b.N) * size / (1 << 30)
			b.ReportMetric(cpu.Seconds()/gib, "cpu-s/GiB")
			b.ReportMetric(float64(b.N)*size/wall.Seconds()/1e6, "MB/s")
		})
	}
}

// writeAll writes every piece of p from src with four writers.
func writeAll(b *testing.B, p *Partial, src []byte) {
	pieces := make(chan int)
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for i := range pieces {
				if _, err := p.WritePiece(i, bytes.NewReader(src)); err != nil {
					b.Error(err)
				}
			}
		})
	}
	for i := range p.Plan().Count() {
		pieces <- i
	}
	close(pieces)
	wg.Wait()
}

// freeJustNow writes size bytes to a file in dir and deletes it, leaving
// that much page cache freed a moment ago.
func freeJustNow(b *testing.B, dir string, size int) {
	name := filepath.Join(dir, "scratch")
	if err := os.WriteFile(name, make([]byte, size), 0o644); err != nil {
		b.Fatal(err)
	}
	if err := os.Remove(name); err != nil {
		b.Fatal(err)
	}
}

// waitReported waits until the guest has reported size more bytes to its
// host than k0 KiB, or skips the benchmark after a minute.
func waitReported(b *testing.B, k0 int64, size int) {
	deadline := time.Now().Add(time.Minute)
	for {
		k := reportedKiB(b)
		if k-k0 >= int64(size)>>10 {
			return
		}
		if time.Now().After(deadline) {
			b.Skipf("the guest reported %d KiB to its host in a minute, not %d", k-k0, size>>10)
		}
		time.Sleep(50 * time.Millisecond) // polls a counter the kernel keeps; nothing signals it
	}
}

func reportedKiB(b *testing.B) int64 {
	v, err := os.ReadFile(reportedFile)
	if err != nil {
		b.Fatal(err)
	}
	k, err := strconv.ParseInt(strings.TrimSpace(string(v)), 10, 64)
	if err != nil {
		b.Fatalf("%s: %v", reportedFile, err)
	}
	return k
}

func processCPU(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
