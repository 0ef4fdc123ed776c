// Package blobstore keeps blobs on disk by digest: complete blobs, verified and
// read-only, and partial blobs that are filled piece by piece.
//
// Layout under the root:
//
//	blobs/<alg>/<2 hex>/<hex>   complete, verified blobs
//	ingest/<alg>-<hex>/         partial blobs: data, pieces, meta.json
//	manifests/<alg>/<hex>       manifests by digest, with <hex>.type beside
//
// A blob becomes complete only through Partial.Commit, which takes the digest
// the caller computed over the bytes: fsync, rename, directory fsync. A crash
// never leaves a half-written file under blobs/.
package blobstore

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/golang-lru/v2/simplelru"
	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/internal/atomicfile"
	"github.com/registry-proxy/registry-proxy/internal/signal"
	"github.com/registry-proxy/registry-proxy/metrics"
)

var (
	// ErrNotFound means the store has no complete blob (or manifest) by that digest.
	ErrNotFound = errors.New("blobstore: not found")
	// ErrBusy means another writer holds the partial blob.
	ErrBusy = errors.New("blobstore: partial blob already open")
	// ErrDigestMismatch means Commit was given a digest other than the blob's.
	ErrDigestMismatch = errors.New("blobstore: digest mismatch")
	// ErrNoSpace means this node's disk has no room for a blob: a local
	// failure, not the upstream's.
	ErrNoSpace = errors.New("blobstore: disk full")
)

// Options tune a Store. The zero value keeps everything forever.
type Options struct {
	// HighWater starts eviction when complete blobs take more bytes than this.
	// Zero disables size-based eviction.
	HighWater int64
	// LowWater is where eviction stops.
	LowWater int64
	// MaxAge evicts blobs not read for this long. Zero disables it.
	MaxAge time.Duration
	// PartialMaxAge removes partial blobs nobody has written to for this
	// long (a closed partial holds the pieces it wrote; the rest of its
	// reservation was given back). Zero: MaxAge.
	PartialMaxAge time.Duration
	// Now is the clock; time.Now when nil.
	Now    func() time.Time
	Logger *slog.Logger
	// Metrics counts garbage collections; may be nil.
	Metrics *metrics.Metrics
	// External is a read-only store beside this one (the node's containerd
	// content store); nil: none.
	External External
}

// Content is an open blob's bytes. This store's blobs and containerd's
// blob files are *os.File, which the kernel's sendfile can send.
type Content interface {
	io.Reader
	io.ReaderAt
	io.Seeker
	io.Closer
}

// External is a read-only store of complete, verified blobs beside this
// one: Get and Stat find its blobs too, and this store drops its own copy
// of a blob the external store holds, so a blob is on the disk once. GC
// never touches the external store's blobs.
type External interface {
	Stat(d digest.Digest) (int64, bool)
	Open(ctx context.Context, d digest.Digest) (Content, int64, error)
	// Blobs lists what it holds; Changed is closed when that changes.
	Blobs() map[digest.Digest]int64
	Changed() <-chan struct{}
}

type entry struct {
	size       int64
	lastAccess time.Time
	persisted  time.Time // last access time written to the file's mtime
}

// Store is a content-addressed blob store on a local disk.
type Store struct {
	gcKick chan struct{} // asks RunGC for a collection now (disk full)
	// shadowKick asks RunGC to drop copies the external store holds: a
	// commit can land after the external store gained the blob (a client
	// finishes reading before the commit syncs), and then no change of the
	// external store comes to say so.
	shadowKick chan struct{}
	root       string
	opts       Options
	log        *slog.Logger

	mu       sync.Mutex
	lru      *simplelru.LRU[digest.Digest, *entry] // complete blobs, least recently used first
	total    int64                                 // bytes of complete blobs
	inUse    map[digest.Digest]int                 // open readers per complete blob
	partials map[digest.Digest]*Partial            // partial blobs open for writing
	removing map[string]chan struct{}              // ingest dirs being removed, closed when gone
	changes  signal.Changes                        // the complete blobs changed
	// syncData is (*os.File).Sync; tests hold a commit's sync open with it.
	syncData func(*os.File) error
}

// Changed returns a channel closed at the next change of the complete
// blobs (Complete), the external store's included while RunGC runs.
func (s *Store) Changed() <-chan struct{} { return s.changes.C() }

// waterMarks puts a missing or too high low mark at 90% of the high one.
func waterMarks(high, low int64) (int64, int64) {
	if high > 0 && (low <= 0 || low > high) {
		low = high * 9 / 10
	}
	return high, low
}

// SetLimits changes GC's marks and maximum age of a running store; the next
// GC applies them.
func (s *Store) SetLimits(high, low int64, maxAge time.Duration) {
	s.mu.Lock()
	s.opts.HighWater, s.opts.LowWater = waterMarks(high, low)
	s.opts.MaxAge = maxAge
	s.mu.Unlock()
	s.kickGC()
}

// Open opens (creating if needed) the store at root and loads the index of
// complete blobs. Partial blobs stay on disk until Ingest resumes them or GC
// removes them; the space they reserved beyond their written pieces (a
// crash leaves it reserved) is given back.
func Open(ctx context.Context, root string, opts Options) (*Store, error) {
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	opts.HighWater, opts.LowWater = waterMarks(opts.HighWater, opts.LowWater)
	for _, d := range []string{"blobs", "ingest", "manifests"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			return nil, fmt.Errorf("blobstore: create %s: %w", d, err)
		}
	}
	l, err := simplelru.NewLRU[digest.Digest, *entry](math.MaxInt32, nil)
	if err != nil {
		return nil, fmt.Errorf("blobstore: %w", err)
	}
	if opts.PartialMaxAge <= 0 {
		opts.PartialMaxAge = opts.MaxAge
	}
	s := &Store{
		gcKick:     make(chan struct{}, 1),
		shadowKick: make(chan struct{}, 1),
		root:       root,
		opts:       opts,
		log:        opts.Logger.With("component", "blobstore"),
		lru:        l,
		inUse:      map[digest.Digest]int{},
		partials:   map[digest.Digest]*Partial{},
		removing:   map[string]chan struct{}{},
		syncData:   (*os.File).Sync,
	}
	if err := s.load(ctx); err != nil {
		return nil, err
	}
	s.shrinkPartials()
	return s, nil
}

// load indexes blobs/ in order of last access (kept as the file's mtime).
func (s *Store) load(ctx context.Context) error {
	type found struct {
		dgst  digest.Digest
		size  int64
		mtime time.Time
	}
	var all []found
	base := filepath.Join(s.root, "blobs")
	err := filepath.WalkDir(base, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if d.IsDir() {
			return nil
		}
		rel, _ := filepath.Rel(base, path)
		parts := strings.Split(rel, string(filepath.Separator))
		var dg digest.Digest
		if len(parts) == 3 {
			dg = digest.NewDigestFromEncoded(digest.Algorithm(parts[0]), parts[2])
		}
		if len(parts) != 3 || dg.Validate() != nil || !strings.HasPrefix(parts[2], parts[1]) {
			s.log.Warn("ignoring stray file in blob store", "path", path)
			return nil
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		all = append(all, found{dg, info.Size(), info.ModTime()})
		return nil
	})
	if err != nil {
		return fmt.Errorf("blobstore: load index: %w", err)
	}
	// A crash between writing a manifest's temporary file and its rename
	// leaves the temporary file: nothing refers to it.
	filepath.WalkDir(filepath.Join(s.root, "manifests"), func(path string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.HasPrefix(d.Name(), atomicfile.TempPrefix) {
			os.Remove(path)
		}
		return nil
	})
	sort.Slice(all, func(i, j int) bool { return all[i].mtime.Before(all[j].mtime) })
	for _, f := range all {
		s.lru.Add(f.dgst, &entry{size: f.size, lastAccess: f.mtime, persisted: f.mtime})
		s.total += f.size
	}
	s.log.Info("blob store opened", "root", s.root, "blobs", len(all), "bytes", s.total)
	return nil
}

func (s *Store) blobPath(d digest.Digest) string {
	enc := d.Encoded()
	return filepath.Join(s.root, "blobs", string(d.Algorithm()), enc[:2], enc)
}

// Blob is an open complete blob. Close it when done; GC never removes a blob
// that is open.
type Blob struct {
	Content
	Size    int64
	ModTime time.Time
	// External: the blob is the external store's (containerd's).
	External bool
	release  func()
	once     sync.Once
}

// Close closes the file and lets GC consider the blob again.
func (b *Blob) Close() error {
	err := b.Content.Close()
	if b.release != nil {
		b.once.Do(b.release)
	}
	return err
}

// Get opens a complete blob for reading: this store's, else the external
// store's.
func (s *Store) Get(ctx context.Context, d digest.Digest) (*Blob, error) {
	s.mu.Lock()
	e, ok := s.lru.Get(d)
	if !ok {
		s.mu.Unlock()
		return s.getExternal(ctx, d)
	}
	s.inUse[d]++
	now := s.opts.Now()
	e.lastAccess = now
	persist := now.Sub(e.persisted) > time.Hour
	if persist {
		e.persisted = now
	}
	s.mu.Unlock()

	release := func() { s.release(d) }
	f, err := os.Open(s.blobPath(d))
	if err != nil {
		release()
		if errors.Is(err, fs.ErrNotExist) {
			s.forget(d)
			return s.getExternal(ctx, d)
		}
		return nil, fmt.Errorf("blobstore: open %s: %w", d, err)
	}
	if persist {
		// mtime carries the access order across restarts; written at most hourly.
		_ = os.Chtimes(f.Name(), now, now)
	}
	return &Blob{Content: f, Size: e.size, ModTime: now, release: release}, nil
}

func (s *Store) getExternal(ctx context.Context, d digest.Digest) (*Blob, error) {
	if s.opts.External == nil {
		return nil, ErrNotFound
	}
	if _, ok := s.opts.External.Stat(d); !ok {
		return nil, ErrNotFound
	}
	c, size, err := s.opts.External.Open(ctx, d)
	if err != nil {
		// Gone since it was listed, or containerd is restarting: as if
		// it were not there; the caller fetches it.
		s.log.Debug("external store cannot open a blob it lists", "digest", d, "err", err)
		return nil, ErrNotFound
	}
	return &Blob{Content: c, Size: size, ModTime: s.opts.Now(), External: true}, nil
}

// Stat returns the size of a complete blob, this store's or the external
// store's.
func (s *Store) Stat(d digest.Digest) (int64, error) {
	s.mu.Lock()
	e, ok := s.lru.Peek(d)
	s.mu.Unlock()
	if ok {
		return e.size, nil
	}
	if s.opts.External != nil {
		if size, ok := s.opts.External.Stat(d); ok {
			return size, nil
		}
	}
	return 0, ErrNotFound
}

// Complete lists every complete blob with its size, this store's and the
// external store's.
func (s *Store) Complete() map[digest.Digest]int64 {
	out := map[digest.Digest]int64{}
	if s.opts.External != nil {
		out = s.opts.External.Blobs()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, d := range s.lru.Keys() {
		if e, ok := s.lru.Peek(d); ok {
			out[d] = e.size
		}
	}
	return out
}

// dropShadowed removes this store's copy of each blob the external store
// holds at the same size; a copy being read stays, and busy says so.
func (s *Store) dropShadowed() (busy bool) {
	ext := s.opts.External.Blobs()
	s.mu.Lock()
	var drop []digest.Digest
	for _, d := range s.lru.Keys() {
		if e, ok := s.lru.Peek(d); ok && ext[d] == e.size && e.size > 0 {
			drop = append(drop, d)
		}
	}
	s.mu.Unlock()
	for _, d := range drop {
		switch err := s.Delete(d); {
		case err == nil:
			s.log.Info("own copy removed: the external store (containerd) holds the blob", "digest", d, "size", ext[d])
		case errors.Is(err, ErrBusy):
			busy = true
		case errors.Is(err, ErrNotFound):
		default:
			s.log.Warn("removing a copy containerd holds", "digest", d, "err", err)
		}
	}
	return busy
}

// Usage returns the number and total bytes of complete blobs.
func (s *Store) Usage() (blobs int, bytes int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lru.Len(), s.total
}

func (s *Store) release(d digest.Digest) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.inUse[d]--; s.inUse[d] <= 0 {
		delete(s.inUse, d)
	}
}

func (s *Store) forget(d digest.Digest) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if e, ok := s.lru.Peek(d); ok {
		s.total -= e.size
		s.lru.Remove(d)
		s.changes.Notify()
	}
}

// Delete removes a complete blob of this store's unless it is being read.
func (s *Store) Delete(d digest.Digest) error {
	s.mu.Lock()
	if s.inUse[d] > 0 {
		s.mu.Unlock()
		return fmt.Errorf("blobstore: delete %s: %w", d, ErrBusy)
	}
	e, ok := s.lru.Peek(d)
	if ok {
		s.total -= e.size
		s.lru.Remove(d)
		s.changes.Notify()
	}
	s.mu.Unlock()
	if !ok {
		return ErrNotFound
	}
	if err := os.Remove(s.blobPath(d)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("blobstore: delete %s: %w", d, err)
	}
	return nil
}
