package blobstore

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"syscall"

	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/internal/atomicfile"
	"github.com/registry-proxy/registry-proxy/internal/signal"
	"github.com/registry-proxy/registry-proxy/piece"
)

var (
	// ErrPieceLength means a piece's source gave more or fewer bytes than the plan says.
	ErrPieceLength = errors.New("blobstore: piece length mismatch")
	// ErrReset means the pieces after a cursor were thrown away (Reset).
	ErrReset = errors.New("blobstore: pieces were reset")
	// ErrClosed means the partial blob was closed before it was committed.
	ErrClosed = errors.New("blobstore: partial blob closed")
)

const (
	recordSize = 8    // per piece: 1 flag byte, 3 zero bytes, CRC-32C
	recordDone = 0x01 // flag: piece written and checksummed
	copyBuf    = 1 << 20
)

var bufPool = sync.Pool{New: func() any { b := make([]byte, copyBuf); return &b }}

type meta struct {
	Digest    digest.Digest `json:"digest"`
	Size      int64         `json:"size"`
	PieceSize int64         `json:"pieceSize"`
}

// Partial is a blob being filled piece by piece, and the one record of which
// of its pieces are done: the task serving it, its readers and the peers
// watching it all read that here. Its methods are safe for concurrent use;
// pieces are written with pwrite at their offsets.
type Partial struct {
	s      *Store
	digest digest.Digest
	plan   piece.Plan
	dir    string

	data    *os.File
	records *os.File

	changes signal.Changes // a piece done, the pieces reset, the blob committed or closed

	mu     sync.Mutex
	done   []bool
	ndone  int
	nbytes int64 // bytes in done pieces
	// log is the done pieces in the order they were done. Reset replaces
	// it rather than clearing it, so a slice of it handed out stays as it
	// was; appends write past every slice handed out.
	log       []piece.Sum
	gen       uint32 // bumped by Reset
	committed bool
	closed    bool
}

func (s *Store) ingestDir(d digest.Digest) string {
	return filepath.Join(s.root, "ingest", string(d.Algorithm())+"-"+d.Encoded())
}

// Ingest opens the partial blob for d, resuming one left on disk when its plan
// matches. Resumed pieces are read back and checked against their recorded
// checksums; a piece that fails is fetched again. Only one Partial per digest
// is open at a time.
func (s *Store) Ingest(ctx context.Context, d digest.Digest, plan piece.Plan) (*Partial, error) {
	if err := d.Validate(); err != nil {
		return nil, fmt.Errorf("blobstore: ingest: %w", err)
	}
	if err := plan.Validate(); err != nil {
		return nil, fmt.Errorf("blobstore: ingest %s: %w", d, err)
	}
	s.mu.Lock()
	if _, ok := s.partials[d]; ok {
		s.mu.Unlock()
		return nil, fmt.Errorf("blobstore: ingest %s: %w", d, ErrBusy)
	}
	p := &Partial{s: s, digest: d, plan: plan, dir: s.ingestDir(d)}
	s.partials[d] = p
	s.mu.Unlock()

	if err := p.open(ctx); err != nil {
		s.mu.Lock()
		delete(s.partials, d)
		s.mu.Unlock()
		p.closeFiles()
		return nil, err
	}
	return p, nil
}

func (p *Partial) open(ctx context.Context) error {
	n := p.plan.Count()
	p.done = make([]bool, n)
	m := meta{Digest: p.digest, Size: p.plan.Size, PieceSize: p.plan.PieceSize}

	resume := false
	if b, err := os.ReadFile(filepath.Join(p.dir, "meta.json")); err == nil {
		var old meta
		resume = json.Unmarshal(b, &old) == nil && old == m
	}
	if !resume {
		if err := os.RemoveAll(p.dir); err != nil {
			return fmt.Errorf("blobstore: reset partial %s: %w", p.digest, err)
		}
		if err := os.MkdirAll(p.dir, 0o755); err != nil {
			return fmt.Errorf("blobstore: create partial %s: %w", p.digest, err)
		}
	}
	var err error
	if p.data, err = os.OpenFile(filepath.Join(p.dir, "data"), os.O_RDWR|os.O_CREATE, 0o644); err != nil {
		return fmt.Errorf("blobstore: open partial data: %w", err)
	}
	if p.records, err = os.OpenFile(filepath.Join(p.dir, "pieces"), os.O_RDWR|os.O_CREATE, 0o644); err != nil {
		return fmt.Errorf("blobstore: open piece records: %w", err)
	}
	if !resume {
		// Checked before anything is reserved, so that one blob cannot
		// take the last of the disk from everything else on the node.
		if free, err := freeBytes(p.dir); err == nil && free < p.plan.Size {
			return p.s.noSpace(p.digest.String(), p.plan.Size, fmt.Errorf("%d bytes free", free))
		}
	}
	if err := p.data.Truncate(p.plan.Size); err != nil {
		return fmt.Errorf("blobstore: size partial data: %w", err)
	}
	if err := allocate(p.data, p.plan.Size); err != nil {
		if errors.Is(err, syscall.ENOSPC) {
			return p.s.noSpace(p.digest.String(), p.plan.Size, err)
		}
		return fmt.Errorf("blobstore: reserve %d bytes for %s: %w", p.plan.Size, p.digest, err)
	}
	if err := p.records.Truncate(int64(n * recordSize)); err != nil {
		return fmt.Errorf("blobstore: size piece records: %w", err)
	}
	if !resume {
		b, _ := json.Marshal(m)
		if err := os.WriteFile(filepath.Join(p.dir, "meta.json"), b, 0o644); err != nil {
			return fmt.Errorf("blobstore: write partial meta: %w", err)
		}
		return nil
	}
	return p.recheck(ctx)
}

// recheck trusts a resumed piece only if its bytes still match its checksum.
func (p *Partial) recheck(ctx context.Context) error {
	recs := make([]byte, len(p.done)*recordSize)
	if _, err := io.ReadFull(io.NewSectionReader(p.records, 0, int64(len(recs))), recs); err != nil {
		return fmt.Errorf("blobstore: read piece records: %w", err)
	}
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	bad := 0
	for i := range p.done {
		if err := ctx.Err(); err != nil {
			return err
		}
		rec := recs[i*recordSize:]
		if rec[0] != recordDone {
			continue
		}
		want := binary.BigEndian.Uint32(rec[4:8])
		off, n := p.plan.Range(i)
		h := piece.NewChecksum()
		if _, err := io.CopyBuffer(h, io.NewSectionReader(p.data, off, n), *bp); err != nil {
			return fmt.Errorf("blobstore: recheck piece %d: %w", i, err)
		}
		if h.Sum32() != want {
			bad++
			if _, err := p.records.WriteAt(make([]byte, recordSize), int64(i*recordSize)); err != nil {
				return fmt.Errorf("blobstore: clear piece record: %w", err)
			}
			continue
		}
		p.markLocked(i, want)
	}
	p.s.log.Info("resumed partial blob", "digest", p.digest, "pieces", len(p.done), "kept", p.ndone, "dropped", bad)
	return nil
}

// Digest returns the digest the blob must have.
func (p *Partial) Digest() digest.Digest { return p.digest }

// Plan returns the piece plan.
func (p *Partial) Plan() piece.Plan { return p.plan }

// Has reports whether piece i is written and checksummed.
func (p *Partial) Has(i int) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return i >= 0 && i < len(p.done) && p.done[i]
}

// DoneFrom returns the first piece from i on that is not done (Count when
// every one is): readers may read up to its offset.
func (p *Partial) DoneFrom(i int) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	for i >= 0 && i < len(p.done) && p.done[i] {
		i++
	}
	return i
}

// DoneBytes is how many bytes of the blob are in done pieces.
func (p *Partial) DoneBytes() int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.nbytes
}

// Since returns the pieces done after c, in the order they were done, and
// the cursor to pass next. The slice is shared: callers must not change it.
// ErrReset says the pieces were thrown away since c was handed out;
// ErrClosed that the blob was closed without being committed.
func (p *Partial) Since(c piece.Cursor) ([]piece.Sum, piece.Cursor, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case p.closed && !p.committed:
		return nil, c, fmt.Errorf("blobstore: %s: %w", p.digest, ErrClosed)
	case c.Gen != 0 && c.Gen != p.gen+1, c.N > len(p.log):
		return nil, c, fmt.Errorf("blobstore: %s: %w", p.digest, ErrReset)
	}
	n := len(p.log)
	return p.log[c.N:n:n], piece.Cursor{Gen: p.gen + 1, N: n}, nil
}

// Changed returns a channel closed at the next change: a piece done, the
// pieces reset, the blob committed or closed. Take it before looking, so
// that a change in between is not missed.
func (p *Partial) Changed() <-chan struct{} { return p.changes.C() }

func (p *Partial) markLocked(i int, crc uint32) {
	p.done[i] = true
	p.ndone++
	_, n := p.plan.Range(i)
	p.nbytes += n
	p.log = append(p.log, piece.Sum{Index: uint32(i), CRC: crc})
}

// Complete reports whether every piece is done.
func (p *Partial) Complete() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.ndone == len(p.done)
}

// WritePiece copies piece i from r to its offset and returns its checksum.
// The piece is not done until MarkDone, so a caller can check the checksum
// against what a parent announced first. r must yield exactly the piece's
// length.
func (p *Partial) WritePiece(i int, r io.Reader) (uint32, error) {
	if i < 0 || i >= len(p.done) {
		return 0, fmt.Errorf("blobstore: piece %d out of range", i)
	}
	off, n := p.plan.Range(i)
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
	h := piece.NewChecksum()
	var written int64
	for {
		m, err := r.Read(buf)
		if m > 0 {
			if written+int64(m) > n {
				return 0, fmt.Errorf("blobstore: piece %d: %w: more than %d bytes", i, ErrPieceLength, n)
			}
			if _, werr := p.data.WriteAt(buf[:m], off+written); werr != nil {
				if errors.Is(werr, syscall.ENOSPC) {
					return 0, p.s.noSpace(p.digest.String(), n, werr)
				}
				return 0, fmt.Errorf("blobstore: write piece %d: %w", i, werr)
			}
			h.Write(buf[:m])
			written += int64(m)
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return 0, fmt.Errorf("blobstore: read piece %d: %w", i, err)
		}
	}
	if written != n {
		return 0, fmt.Errorf("blobstore: piece %d: %w: got %d of %d bytes", i, ErrPieceLength, written, n)
	}
	return h.Sum32(), nil
}

// MarkDone records piece i as written with checksum crc. It returns false if
// the piece was already done.
func (p *Partial) MarkDone(i int, crc uint32) (bool, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false, fmt.Errorf("blobstore: mark piece %d: %w", i, ErrClosed)
	}
	if p.done[i] {
		return false, nil
	}
	var rec [recordSize]byte
	rec[0] = recordDone
	binary.BigEndian.PutUint32(rec[4:], crc)
	if _, err := p.records.WriteAt(rec[:], int64(i*recordSize)); err != nil {
		return false, fmt.Errorf("blobstore: record piece %d: %w", i, err)
	}
	p.markLocked(i, crc)
	p.changes.Notify()
	return true, nil
}

// Reset forgets every piece, for a blob whose bytes failed verification.
func (p *Partial) Reset() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	defer p.changes.Notify()
	for i := range p.done {
		p.done[i] = false
	}
	p.ndone, p.nbytes, p.log = 0, 0, nil
	p.gen++
	if err := p.records.Truncate(0); err != nil {
		return fmt.Errorf("blobstore: reset records: %w", err)
	}
	if err := p.records.Truncate(int64(len(p.done) * recordSize)); err != nil {
		return fmt.Errorf("blobstore: reset records: %w", err)
	}
	return nil
}

// ReadAt reads the partial data; callers read only pieces that are done.
func (p *Partial) ReadAt(b []byte, off int64) (int, error) { return p.data.ReadAt(b, off) }

// OpenData opens the blob's bytes for reading through a file of its own, which
// stays valid after Commit moves the file.
func (p *Partial) OpenData() (*os.File, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	path := filepath.Join(p.dir, "data")
	if p.committed {
		path = p.s.blobPath(p.digest)
	}
	return os.Open(path)
}

// Commit makes the blob complete. verified is the digest the caller computed
// over the blob's bytes; anything but the blob's own digest is refused, so an
// unverified blob can't become complete.
func (p *Partial) Commit(verified digest.Digest) error {
	if verified != p.digest {
		return fmt.Errorf("blobstore: commit %s: computed %s: %w", p.digest, verified, ErrDigestMismatch)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed || p.committed {
		return fmt.Errorf("blobstore: commit %s: partial closed", p.digest)
	}
	if p.ndone != len(p.done) {
		return fmt.Errorf("blobstore: commit %s: %d of %d pieces done", p.digest, p.ndone, len(p.done))
	}
	if err := p.data.Sync(); err != nil {
		return fmt.Errorf("blobstore: commit %s: sync: %w", p.digest, err)
	}
	dst := p.s.blobPath(p.digest)
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return fmt.Errorf("blobstore: commit %s: %w", p.digest, err)
	}
	if err := os.Chmod(filepath.Join(p.dir, "data"), 0o444); err != nil {
		return fmt.Errorf("blobstore: commit %s: %w", p.digest, err)
	}
	if err := os.Rename(filepath.Join(p.dir, "data"), dst); err != nil {
		return fmt.Errorf("blobstore: commit %s: rename: %w", p.digest, err)
	}
	if err := atomicfile.SyncDir(filepath.Dir(dst)); err != nil {
		return fmt.Errorf("blobstore: commit %s: sync dir: %w", p.digest, err)
	}
	p.committed = true
	p.records.Close()
	if err := os.RemoveAll(p.dir); err != nil {
		p.s.log.Warn("removing ingest dir after commit", "dir", p.dir, "err", err)
	}

	p.s.mu.Lock()
	if _, ok := p.s.lru.Peek(p.digest); !ok {
		p.s.total += p.plan.Size
	}
	now := p.s.opts.Now()
	p.s.lru.Add(p.digest, &entry{size: p.plan.Size, lastAccess: now, persisted: now})
	p.s.changes.Notify()
	p.s.mu.Unlock()
	// Watchers that look now find the blob in the store.
	p.changes.Notify()
	return nil
}

// Discard closes the partial blob and deletes its files.
func (p *Partial) Discard() error {
	p.Close()
	if p.committed {
		return nil
	}
	if err := os.RemoveAll(p.dir); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("blobstore: discard %s: %w", p.digest, err)
	}
	return nil
}

// Close releases the partial blob; an uncommitted one stays on disk to resume.
func (p *Partial) Close() {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	p.closed = true
	p.mu.Unlock()
	p.changes.Notify()
	p.closeFiles()
	p.s.mu.Lock()
	if p.s.partials[p.digest] == p {
		delete(p.s.partials, p.digest)
	}
	p.s.mu.Unlock()
}

func (p *Partial) closeFiles() {
	if p.data != nil {
		p.data.Close()
	}
	if p.records != nil {
		p.records.Close()
	}
}
