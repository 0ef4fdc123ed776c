package blobstore

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/opencontainers/go-digest"
)

// GCResult says what one collection did.
type GCResult struct {
	Removed int
	Freed   int64
	// Partials is the number of abandoned partial blobs removed.
	Partials int
}

// GC evicts complete blobs, least recently read first, while the store is above
// its high water mark (down to the low one), and every blob not read within
// MaxAge. Blobs being read and partial blobs being written are never touched;
// partial blobs nobody has written to within MaxAge are removed.
func (s *Store) GC(ctx context.Context) (GCResult, error) {
	var res GCResult
	now := s.opts.Now()
	s.mu.Lock()
	var victims []digest.Digest
	total := s.total
	overSize := s.opts.HighWater > 0 && total > s.opts.HighWater
	for _, d := range s.lru.Keys() { // oldest first
		e, _ := s.lru.Peek(d)
		old := s.opts.MaxAge > 0 && now.Sub(e.lastAccess) > s.opts.MaxAge
		if !old && !(overSize && total > s.opts.LowWater) {
			if !overSize {
				break // newer entries are younger still
			}
			continue
		}
		if s.inUse[d] > 0 {
			continue
		}
		victims = append(victims, d)
		total -= e.size
	}
	s.mu.Unlock()

	var errs []error
	for _, d := range victims {
		if ctx.Err() != nil {
			break
		}
		size, err := s.Stat(d)
		if err != nil {
			continue
		}
		if err := s.Delete(d); err != nil {
			if !errors.Is(err, ErrBusy) && !errors.Is(err, ErrNotFound) {
				errs = append(errs, err)
			}
			continue
		}
		res.Removed++
		res.Freed += size
	}
	if s.opts.PartialMaxAge > 0 {
		n, err := s.gcPartials(now)
		res.Partials = n
		if err != nil {
			errs = append(errs, err)
		}
	}
	if res.Removed > 0 || res.Partials > 0 {
		s.log.Info("gc", "removed", res.Removed, "freed", res.Freed, "partials", res.Partials)
	}
	return res, errors.Join(errs...)
}

func (s *Store) gcPartials(now time.Time) (int, error) {
	dirs, err := os.ReadDir(filepath.Join(s.root, "ingest"))
	if err != nil {
		return 0, err
	}
	n := 0
	var errs []error
	for _, de := range dirs {
		dir := filepath.Join(s.root, "ingest", de.Name())
		s.mu.Lock()
		busy := false
		for _, p := range s.partials {
			if p.dir == dir {
				busy = true
			}
		}
		s.mu.Unlock()
		if busy {
			continue
		}
		info, err := os.Stat(filepath.Join(dir, "pieces"))
		if err == nil && now.Sub(info.ModTime()) <= s.opts.PartialMaxAge {
			continue
		}
		if err := os.RemoveAll(dir); err != nil {
			errs = append(errs, err)
			continue
		}
		n++
	}
	return n, errors.Join(errs...)
}

// RunGC collects every interval until ctx ends.
func (s *Store) RunGC(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-s.gcKick:
		}
		if _, err := s.GC(ctx); err != nil {
			s.log.Warn("gc failed", "err", err)
		}
	}
}

// noSpace records a full disk: it asks RunGC to collect now and returns
// the error callers branch on.
func (s *Store) noSpace(what string, need int64, err error) error {
	select {
	case s.gcKick <- struct{}{}:
	default:
	}
	s.log.Error("disk full", "root", s.root, "need", need, "for", what, "err", err)
	return fmt.Errorf("%w: %s needs %d bytes under %s: %w", ErrNoSpace, what, need, s.root, err)
}
