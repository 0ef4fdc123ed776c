package blobstore

import (
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/registry-proxy/registry-proxy/piece"
)

// A partial blob reserves its whole size when its download starts
// (allocate). A download that stops before the end (nobody wants the blob,
// the node shuts down, it failed) gives back the blocks of the pieces it has
// not written: the written pieces stay to resume, and the store counts what
// the partial holds on disk, not its size. When a new download cannot
// reserve its space, partial blobs no download has open go, oldest first,
// before the store answers ErrNoSpace.

// releaseUnwritten punches out of f every run of pieces that done says is
// not written, and returns the bytes those runs span.
func releaseUnwritten(f *os.File, plan piece.Plan, done func(i int) bool) (int64, error) {
	var span int64
	n := plan.Count()
	for i := 0; i < n; {
		if done(i) {
			i++
			continue
		}
		j := i
		for j < n && !done(j) {
			j++
		}
		off, _ := plan.Range(i)
		end := plan.Size
		if j < n {
			end, _ = plan.Range(j)
		}
		if err := punchHole(f, off, end-off); err != nil {
			return span, err
		}
		span += end - off
		i = j
	}
	return span, nil
}

// held is the disk space a partial blob's data file holds: its blocks, at
// most its size (blocks round a small file up).
func held(dir string) int64 {
	fi, err := os.Stat(filepath.Join(dir, "data"))
	if err != nil {
		return 0
	}
	return min(allocatedBytes(fi), fi.Size())
}

// shrinkDir gives back the space a partial blob on disk reserved beyond the
// pieces its records say are written: one left by a crash, or by a download
// that failed to open. A directory without a valid plan (a crash before its
// metadata was written) holds nothing to resume and goes. It returns the
// bytes freed.
func shrinkDir(dir string) (int64, error) {
	before := held(dir)
	b, err := os.ReadFile(filepath.Join(dir, "meta.json"))
	if errors.Is(err, fs.ErrNotExist) {
		return before, os.RemoveAll(dir)
	}
	if err != nil {
		return 0, err
	}
	var m meta
	if json.Unmarshal(b, &m) != nil {
		return before, os.RemoveAll(dir)
	}
	plan := piece.Plan{Size: m.Size, PieceSize: m.PieceSize}
	if plan.Validate() != nil {
		return before, os.RemoveAll(dir)
	}
	f, err := os.OpenFile(filepath.Join(dir, "data"), os.O_RDWR, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	defer f.Close()
	recs, _ := os.ReadFile(filepath.Join(dir, "pieces")) // missing records: pieces not written
	done := func(i int) bool { return (i+1)*recordSize <= len(recs) && recs[i*recordSize] == recordDone }
	if _, err := releaseUnwritten(f, plan, done); err != nil {
		return 0, err
	}
	return max(before-held(dir), 0), nil
}

// shrinkPartials runs shrinkDir over every partial blob on disk; Open calls
// it before any download runs.
func (s *Store) shrinkPartials() {
	des, err := os.ReadDir(filepath.Join(s.root, "ingest"))
	if err != nil {
		return
	}
	var freed int64
	for _, de := range des {
		n, err := shrinkDir(filepath.Join(s.root, "ingest", de.Name()))
		if err != nil && !errors.Is(err, errors.ErrUnsupported) {
			s.log.Warn("giving back the unwritten space of a partial blob", "dir", de.Name(), "err", err)
		}
		freed += n
	}
	if freed > 0 {
		s.log.Info("gave back the space partial blobs reserved but never wrote", "partials", len(des), "freed", freed)
	}
}

// openDirLocked reports whether a Partial of this store has dir open.
func (s *Store) openDirLocked(dir string) bool {
	for _, p := range s.partials {
		if p.dir == dir {
			return true
		}
	}
	return false
}

// claimRemoval marks dir as being removed unless a download has it open or
// it is being removed already; Ingest of its digest waits meanwhile.
// endRemoval ends the claim.
func (s *Store) claimRemoval(dir string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.removing[dir]; ok || s.openDirLocked(dir) {
		return false
	}
	s.removing[dir] = make(chan struct{})
	return true
}

// removeIdle removes a partial blob's directory unless a download has it
// open or it is being removed already; removed says whether it was taken.
func (s *Store) removeIdle(dir string) (removed bool, err error) {
	if !s.claimRemoval(dir) {
		return false, nil
	}
	err = os.RemoveAll(dir)
	s.endRemoval(dir)
	return err == nil, err
}

func (s *Store) endRemoval(dir string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if c, ok := s.removing[dir]; ok {
		close(c)
		delete(s.removing, dir)
	}
}

// idlePartial is a partial blob no download has open.
type idlePartial struct {
	dir  string
	mod  time.Time // last piece written, roughly
	held int64
}

// idlePartials lists the partial blobs no download has open, least
// recently written first.
func (s *Store) idlePartials() []idlePartial {
	des, err := os.ReadDir(filepath.Join(s.root, "ingest"))
	if err != nil {
		return nil
	}
	var out []idlePartial
	for _, de := range des {
		dir := filepath.Join(s.root, "ingest", de.Name())
		s.mu.Lock()
		busy := s.openDirLocked(dir)
		s.mu.Unlock()
		if busy {
			continue
		}
		ip := idlePartial{dir: dir, held: held(dir)}
		if fi, err := os.Stat(filepath.Join(dir, "pieces")); err == nil {
			ip.mod = fi.ModTime()
		} else if fi, err := de.Info(); err == nil {
			ip.mod = fi.ModTime()
		}
		out = append(out, ip)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].mod.Before(out[j].mod) })
	return out
}

// reclaimPartials removes partial blobs no download has open, least
// recently written first, until need bytes are free under the store's
// root. A partial a download has open is never touched, nor a complete
// blob; none goes when all of them would not make room. It returns how
// many it removed and the bytes they held.
func (s *Store) reclaimPartials(need int64) (removed int, freed int64) {
	idle := s.idlePartials()
	var all int64
	for _, ip := range idle {
		all += ip.held
	}
	if free, err := freeBytes(s.root); err != nil || free+all < need {
		return 0, 0
	}
	for _, ip := range idle {
		if free, err := freeBytes(s.root); err != nil || free >= need {
			break
		}
		ok, err := s.removeIdle(ip.dir)
		if err != nil {
			s.log.Warn("removing an idle partial blob for space", "dir", ip.dir, "err", err)
		}
		if !ok {
			continue
		}
		removed++
		freed += ip.held
	}
	if removed > 0 {
		s.log.Info("disk short: removed partial blobs no download was using", "partials", removed, "freed", freed, "need", need)
		s.opts.Metrics.GC(0, removed, 0, freed)
	}
	return removed, freed
}
