// Package ctrstore reads the node's containerd content store: which blobs
// containerd holds in the configured namespaces (kept current by content
// events where containerd sends them, and by listing), and their bytes,
// from containerd's blob files when its content directory is readable
// (the kernel's sendfile can then send them) or through containerd's API.
// It never writes or deletes anything in containerd.
package ctrstore

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	apievents "github.com/containerd/containerd/api/events"
	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/typeurl/v2"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/registry-proxy/registry-proxy/internal/signal"
)

// ErrNotFound: containerd holds no such blob in the configured namespaces,
// or it cannot be reached now.
var ErrNotFound = errors.New("ctrstore: blob not in containerd's content store")

// Options configure a Store.
type Options struct {
	// Address is containerd's socket.
	Address string
	// Namespaces are the containerd namespaces whose content is served.
	Namespaces []string
	// ContentDir is containerd's content directory
	// (<root>/io.containerd.content.v1.content); blobs are read from its
	// files when it is readable, else through the API.
	ContentDir string
	// ListInterval is how often the content is listed when containerd sends
	// no content-create events (1.6); with events, every 30 intervals.
	ListInterval time.Duration
	Logger       *slog.Logger
}

type entry struct {
	size int64
	ns   map[string]bool
}

// Store is the view of containerd's content store. Run keeps it current.
type Store struct {
	opts Options
	log  *slog.Logger

	mu      sync.Mutex
	client  *containerd.Client // nil while containerd is unreachable
	files   bool               // blobs are read from ContentDir
	index   map[digest.Digest]entry
	changes signal.Changes
	// bufs recycles the API readers' chunk buffers.
	bufs sync.Pool
}

// New returns a store; it holds nothing until Run has listed containerd.
func New(opts Options) *Store {
	if opts.ListInterval <= 0 {
		opts.ListInterval = 10 * time.Second
	}
	if len(opts.Namespaces) == 0 {
		opts.Namespaces = []string{"k8s.io"}
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	return &Store{
		opts:  opts,
		log:   opts.Logger.With("component", "containerd", "address", opts.Address),
		index: map[digest.Digest]entry{},
		bufs:  sync.Pool{New: func() any { b := make([]byte, apiChunk); return &b }},
	}
}

// Changed returns a channel closed at the next change of the set of blobs.
func (s *Store) Changed() <-chan struct{} { return s.changes.C() }

// Stat returns the size of a blob containerd holds.
func (s *Store) Stat(d digest.Digest) (int64, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.index[d]
	return e.size, ok
}

// Len is the number of blobs containerd holds in the namespaces.
func (s *Store) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.index)
}

// Blobs returns every blob containerd holds, with its size.
func (s *Store) Blobs() map[digest.Digest]int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[digest.Digest]int64, len(s.index))
	for d, e := range s.index {
		out[d] = e.size
	}
	return out
}

// Reader is an open blob of containerd's.
type Reader interface {
	io.Reader
	io.ReaderAt
	io.Seeker
	io.Closer
}

// Open opens a blob containerd holds: its file (an *os.File) where the
// content directory is readable, else a reader over the API.
func (s *Store) Open(ctx context.Context, d digest.Digest) (Reader, int64, error) {
	s.mu.Lock()
	e, ok := s.index[d]
	c, files := s.client, s.files
	var ns string
	for n := range e.ns {
		ns = n
		break
	}
	s.mu.Unlock()
	if !ok || c == nil {
		return nil, 0, ErrNotFound
	}
	if files {
		f, err := os.Open(s.blobFile(d))
		if err == nil {
			if fi, err := f.Stat(); err == nil && fi.Size() == e.size {
				return f, e.size, nil
			}
			f.Close()
		} else if !errors.Is(err, fs.ErrNotExist) {
			s.log.Warn("reading containerd's blob file; using its API", "digest", d, "err", err)
		}
	}
	ra, err := c.ContentStore().ReaderAt(namespaces.WithNamespace(ctx, ns), ocispec.Descriptor{Digest: d, Size: e.size})
	if err != nil {
		return nil, 0, fmt.Errorf("ctrstore: open %s: %w", d, errors.Join(ErrNotFound, err))
	}
	if ra.Size() != e.size {
		ra.Close()
		return nil, 0, fmt.Errorf("ctrstore: %s is %d bytes in containerd, listed as %d: %w", d, ra.Size(), e.size, ErrNotFound)
	}
	return &apiReader{ra: ra, size: e.size, pool: &s.bufs}, e.size, nil
}

// apiChunk is how much one read through containerd's API asks for: each
// is a round trip, and a reader's usual 32 KiB would make the API crawl
// (1 GiB to a peer on loopback: 42 MB/s in 32 KiB reads, 93 MB/s in
// these; the files, 180 MB/s).
const apiChunk = 4 << 20

// apiReader reads a blob through containerd's API in apiChunk reads.
type apiReader struct {
	ra         content.ReaderAt
	size, off  int64
	buf        []byte
	pool       *sync.Pool // of chunk buffers
	bufp       *[]byte    // buf's, from pool
	bufOff     int64      // the blob offset of buf[0]
	bufN, bufR int        // bytes in buf, bytes of them read
}

func (r *apiReader) Read(p []byte) (int, error) {
	if r.off >= r.size {
		return 0, io.EOF
	}
	if r.bufR >= r.bufN || r.bufOff+int64(r.bufR) != r.off {
		if r.buf == nil {
			r.bufp = r.pool.Get().(*[]byte)
			r.buf = *r.bufp
		}
		n, err := r.ra.ReadAt(r.buf[:min(int64(apiChunk), r.size-r.off)], r.off)
		if n == 0 {
			if err == nil || err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return 0, err
		}
		r.bufOff, r.bufN, r.bufR = r.off, n, 0
	}
	n := copy(p, r.buf[r.bufR:r.bufN])
	r.bufR += n
	r.off += int64(n)
	return n, nil
}

func (r *apiReader) ReadAt(p []byte, off int64) (int, error) {
	if off >= r.size {
		return 0, io.EOF
	}
	if int64(len(p)) > r.size-off {
		n, err := r.ra.ReadAt(p[:r.size-off], off)
		if err == nil {
			err = io.EOF
		}
		return n, err
	}
	return r.ra.ReadAt(p, off)
}

func (r *apiReader) Seek(offset int64, whence int) (int64, error) {
	switch whence {
	case io.SeekCurrent:
		offset += r.off
	case io.SeekEnd:
		offset += r.size
	}
	if offset < 0 {
		return 0, errors.New("ctrstore: seek before the start")
	}
	r.off = offset
	return offset, nil
}

func (r *apiReader) Close() error {
	if r.bufp != nil {
		r.pool.Put(r.bufp)
		r.bufp, r.buf = nil, nil
	}
	return r.ra.Close()
}

func (s *Store) blobFile(d digest.Digest) string {
	return filepath.Join(s.opts.ContentDir, "blobs", string(d.Algorithm()), d.Encoded())
}

// Run follows containerd until ctx ends: it connects, lists the content,
// follows content events, and when containerd goes away (a restart) holds
// nothing until it is back, reconnecting with backoff. The log says once
// why containerd's content is not served, and when it is again.
func (s *Store) Run(ctx context.Context) {
	backoff := time.Second
	down := ""
	for {
		began := time.Now()
		err := s.session(ctx, func() {
			if down != "" {
				s.log.Info("containerd reachable again; serving its content store")
			}
			down = ""
		})
		s.clear()
		if ctx.Err() != nil {
			return
		}
		if time.Since(began) > time.Minute {
			backoff = time.Second
		}
		if msg := err.Error(); down == "" {
			s.log.Warn("containerd not reachable; its content is not served until it is (everything else works as without it)", "err", msg)
			down = msg
		} else {
			s.log.Debug("containerd still not reachable", "err", msg, "retry_in", backoff)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 30*time.Second)
	}
}

func (s *Store) clear() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.client != nil {
		s.client.Close()
		s.client = nil
	}
	if len(s.index) > 0 {
		s.index = map[digest.Digest]entry{}
		s.changes.Notify()
	}
}

// session serves one connection to containerd until it fails.
func (s *Store) session(ctx context.Context, up func()) error {
	if err := checkSocket(s.opts.Address); err != nil {
		return err
	}
	c, err := containerd.New(s.opts.Address, containerd.WithTimeout(5*time.Second))
	if err != nil {
		return fmt.Errorf("ctrstore: connect: %w", err)
	}
	vctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	v, err := c.Version(vctx)
	cancel()
	if err != nil {
		c.Close()
		return fmt.Errorf("ctrstore: containerd at %s: %w", s.opts.Address, err)
	}
	sctx, stop := context.WithCancel(ctx)
	defer stop()
	events, errs := c.Subscribe(sctx, `topic~="/content/"`)
	// containerd 1.6 sends no event when content is created: it is listed
	// often instead.
	creates := !strings.HasPrefix(v.Version, "v1.6.") && !strings.HasPrefix(v.Version, "1.6.")
	every := s.opts.ListInterval
	if creates {
		every *= 30
	}
	files := false
	if s.opts.ContentDir != "" {
		if fi, err := os.Stat(filepath.Join(s.opts.ContentDir, "blobs")); err == nil && fi.IsDir() {
			files = true
		}
	}
	s.mu.Lock()
	s.client, s.files = c, files
	s.mu.Unlock()
	if err := s.list(ctx, c); err != nil {
		return err
	}
	mode := "api"
	if files {
		mode = "files in " + s.opts.ContentDir
	}
	attrs := []any{"version", v.Version, "namespaces", s.opts.Namespaces, "blobs", s.Len(), "reads", mode, "content_events", creates, "list_every", every}
	if !files && s.opts.ContentDir != "" {
		// Why the files are not read, for the operator who mounts them.
		attrs = append(attrs, "content_dir_err", contentDirErr(s.opts.ContentDir))
	}
	s.log.Info("serving containerd's content store", attrs...)
	up()
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
			if err := s.list(ctx, c); err != nil {
				return err
			}
		case err := <-errs:
			if err == nil {
				err = errors.New("event stream closed")
			}
			return fmt.Errorf("ctrstore: events: %w", err)
		case env := <-events:
			if env == nil || !s.watched(env.Namespace) {
				continue
			}
			ev, err := typeurl.UnmarshalAny(env.Event)
			if err != nil {
				continue
			}
			switch e := ev.(type) {
			case *apievents.ContentCreate:
				if d, err := digest.Parse(e.Digest); err == nil {
					s.add(env.Namespace, d, e.Size)
				}
			case *apievents.ContentDelete:
				if d, err := digest.Parse(e.Digest); err == nil {
					s.remove(env.Namespace, d)
				}
			}
		}
	}
}

// checkSocket says why address (a path, or unix://path) is no socket to
// dial, in words an operator acts on; nil when it is one, or not a path.
func checkSocket(address string) error {
	path, ok := strings.CutPrefix(address, "unix://")
	if !ok && strings.Contains(address, "://") {
		return nil
	}
	fi, err := os.Stat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("ctrstore: no socket at %s: containerd is not running, or keeps its socket elsewhere (containerd.address)", path)
	case err != nil:
		return fmt.Errorf("ctrstore: containerd's socket: %w", err)
	case fi.Mode().Type() != fs.ModeSocket:
		return fmt.Errorf("ctrstore: %s is not a socket but a %s (containerd.address)", path, typeName(fi.Mode()))
	}
	return nil
}

func typeName(m fs.FileMode) string {
	switch {
	case m.IsDir():
		return "directory"
	case m.IsRegular():
		return "regular file"
	}
	return m.Type().String()
}

// contentDirErr says why containerd's blob files under dir are not read.
func contentDirErr(dir string) string {
	fi, err := os.Stat(filepath.Join(dir, "blobs"))
	switch {
	case err != nil:
		return err.Error()
	case !fi.IsDir():
		return dir + "/blobs is not a directory"
	}
	return ""
}

func (s *Store) watched(ns string) bool { return slices.Contains(s.opts.Namespaces, ns) }

// list replaces the index with containerd's content in the namespaces.
func (s *Store) list(ctx context.Context, c *containerd.Client) error {
	index := map[digest.Digest]entry{}
	for _, ns := range s.opts.Namespaces {
		lctx, cancel := context.WithTimeout(namespaces.WithNamespace(ctx, ns), time.Minute)
		err := c.ContentStore().Walk(lctx, func(info content.Info) error {
			e, ok := index[info.Digest]
			if !ok {
				e = entry{size: info.Size, ns: map[string]bool{}}
			}
			e.ns[ns] = true
			index[info.Digest] = e
			return nil
		})
		cancel()
		if err != nil {
			return fmt.Errorf("ctrstore: list namespace %s: %w", ns, err)
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	// The namespaces of each blob always come from the listing (Open reads
	// through one of them); a change is signalled only when the blobs or
	// their sizes changed.
	same := len(s.index) == len(index)
	for d, e := range index {
		if f, ok := s.index[d]; !ok || f.size != e.size {
			same = false
			break
		}
	}
	s.index = index
	if !same {
		s.changes.Notify()
	}
	return nil
}

func (s *Store) add(ns string, d digest.Digest, size int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.index[d]
	if !ok {
		e = entry{size: size, ns: map[string]bool{}}
	}
	e.ns[ns] = true
	s.index[d] = e
	if !ok {
		s.changes.Notify()
	}
}

func (s *Store) remove(ns string, d digest.Digest) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.index[d]
	if !ok {
		return
	}
	delete(e.ns, ns)
	if len(e.ns) == 0 {
		delete(s.index, d)
		s.changes.Notify()
	}
}
