package blobstore

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/internal/atomicfile"
)

// GCResult says what one collection did.
type GCResult struct {
	Removed int
	Freed   int64
	// Partials is the number of abandoned partial blobs removed.
	Partials int
	// Manifests is the number of manifests removed.
	Manifests int
}

// manifestFile is a stored manifest as GC sees it.
type manifestFile struct {
	path string
	size int64
	mod  time.Time // last read, roughly: GetManifest refreshes it hourly
}

// otherUsage is what the store holds besides complete blobs: the space
// partial blobs hold on disk (a running download's whole size, reserved; a
// stopped one's written pieces), and the manifests, oldest first.
func (s *Store) otherUsage() (partials int64, manifests []manifestFile) {
	if des, err := os.ReadDir(filepath.Join(s.root, "ingest")); err == nil {
		for _, de := range des {
			partials += held(filepath.Join(s.root, "ingest", de.Name()))
		}
	}
	filepath.WalkDir(filepath.Join(s.root, "manifests"), func(path string, de fs.DirEntry, err error) error {
		if err != nil || de.IsDir() || strings.HasSuffix(path, ".type") || strings.HasPrefix(de.Name(), atomicfile.TempPrefix) {
			return nil
		}
		if fi, err := de.Info(); err == nil {
			manifests = append(manifests, manifestFile{path: path, size: fi.Size(), mod: fi.ModTime()})
		}
		return nil
	})
	sort.Slice(manifests, func(i, j int) bool { return manifests[i].mod.Before(manifests[j].mod) })
	return partials, manifests
}

// GC evicts complete blobs, least recently read first, while the store is above
// its high water mark (down to the low one), and every blob not read within
// MaxAge. Partial blobs (the space they hold: a running download's
// reservation, a stopped one's written pieces) and manifests count toward
// the marks; manifests go, oldest first, when evicting blobs was not
// enough, and after MaxAge unread; then partial blobs no download has open,
// least recently written first. Blobs being read and partial blobs being
// written are never touched; partial blobs nobody has written to within
// PartialMaxAge are removed.
func (s *Store) GC(ctx context.Context) (GCResult, error) {
	var res GCResult
	now := s.opts.Now()
	partials, manifests := s.otherUsage()
	var manifestBytes int64
	for _, m := range manifests {
		manifestBytes += m.size
	}
	s.mu.Lock()
	high, low, maxAge := s.opts.HighWater, s.opts.LowWater, s.opts.MaxAge
	var victims []digest.Digest
	total := s.total + partials + manifestBytes
	overSize := high > 0 && total > high
	for _, d := range s.lru.Keys() { // oldest first
		e, _ := s.lru.Peek(d)
		old := maxAge > 0 && now.Sub(e.lastAccess) > maxAge
		if !old && !(overSize && total > low) {
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
	// Manifests: past MaxAge, or oldest first while still above the mark.
	for _, m := range manifests {
		old := maxAge > 0 && now.Sub(m.mod) > maxAge
		over := overSize && total > low
		if !old && !over {
			continue
		}
		if err := os.Remove(m.path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
			continue
		}
		os.Remove(m.path + ".type")
		total -= m.size
		res.Manifests++
	}
	// Still above the mark: partial blobs no download has open, least
	// recently written first (a stopped one holds what it wrote).
	if overSize && total > low {
		for _, ip := range s.idlePartials() {
			if total <= low || ctx.Err() != nil {
				break
			}
			removed, err := s.removeIdle(ip.dir)
			if err != nil {
				errs = append(errs, err)
			}
			if !removed {
				continue
			}
			total -= ip.held
			res.Partials++
		}
	}
	if s.opts.PartialMaxAge > 0 {
		n, err := s.gcPartials(now)
		res.Partials += n
		if err != nil {
			errs = append(errs, err)
		}
	}
	s.opts.Metrics.GC(res.Removed, res.Partials, res.Manifests, res.Freed)
	if res.Removed > 0 || res.Partials > 0 || res.Manifests > 0 {
		s.log.Info("gc", "removed", res.Removed, "freed", res.Freed, "partials", res.Partials, "manifests", res.Manifests)
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
		info, err := os.Stat(filepath.Join(dir, "pieces"))
		if err == nil && now.Sub(info.ModTime()) <= s.opts.PartialMaxAge {
			continue
		}
		removed, err := s.removeIdle(dir) // not one a download has open
		if err != nil {
			errs = append(errs, err)
		}
		if removed {
			n++
		}
	}
	return n, errors.Join(errs...)
}

// RunGC collects every interval until ctx ends. With an external store it
// also drops this store's copies of the blobs the external store holds:
// when that changes, when this store commits a blob it holds, and again
// shortly after for a copy that was being read.
func (s *Store) RunGC(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	var changed <-chan struct{}
	retry := time.NewTimer(0)
	defer retry.Stop()
	if s.opts.External != nil {
		changed = s.opts.External.Changed()
	} else {
		retry.Stop()
	}
	drop := func() {
		if s.dropShadowed() {
			retry.Reset(shadowRetry)
		}
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-s.gcKick:
		case <-changed:
			changed = s.opts.External.Changed()
			s.changes.Notify() // Complete changed with the external store
			drop()
			continue
		case <-retry.C:
			drop()
			continue
		case <-s.shadowKick:
			drop()
			continue
		}
		if changed != nil {
			s.dropShadowed()
		}
		if _, err := s.GC(ctx); err != nil {
			s.log.Warn("gc failed", "err", err)
		}
	}
}

// shadowRetry is how soon a copy the external store holds is tried again
// when it was being read.
const shadowRetry = 2 * time.Second

// kickGC asks RunGC for a collection now.
func (s *Store) kickGC() { s.kick(s.gcKick) }

// kick sends on a buffered channel of one unless a kick is already waiting.
func (s *Store) kick(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// noSpace records a full disk: it asks RunGC to collect now and returns
// the error callers branch on.
func (s *Store) noSpace(what string, need int64, err error) error {
	s.kickGC()
	s.log.Error("disk full", "root", s.root, "need", need, "for", what, "err", err)
	return fmt.Errorf("%w: %s needs %d bytes under %s: %w", ErrNoSpace, what, need, s.root, err)
}
