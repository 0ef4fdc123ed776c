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
	"slices"
	"sync"
	"syscall"

	"github.com/opencontainers/go-digest"

	"github.com/registry-proxy/registry-proxy/internal/atomicfile"
	"github.com/registry-proxy/registry-proxy/piece"
)

// ErrPieceLength means a piece's source gave more or fewer bytes than the plan says.
var ErrPieceLength = errors.New("blobstore: piece length mismatch")

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

// Partial is a blob being filled piece by piece. Its methods are safe for
// concurrent use; pieces are written with pwrite at their offsets.
type Partial struct {
	s      *Store
	digest digest.Digest
	plan   piece.Plan
	dir    string

	data    *os.File
	records *os.File

	mu        sync.Mutex
	done      []bool
	crc       []uint32
	ndone     int
	committed bool
	// committing: Commit is syncing the data, without the lock.
	committing bool
	closed     bool
	// sealed: Commit was given the blob's own digest; its bytes may be
	// read to the end while it syncs.
	sealed bool
	// resets counts Reset calls: bytes read before one may not be the blob's.
	resets int
	// changed is closed and replaced at every change (a piece done, Reset,
	// sealed, committed, closed).
	changed chan struct{}
}

// State is what a reader of a partial blob needs at one instant.
type State struct {
	// End is the end of the run of done pieces from the offset asked
	// about (the offset itself when its piece is not done).
	End int64
	// Sealed: the bytes have matched the blob's digest.
	Sealed bool
	// Resets is the number of Resets so far.
	Resets int
	// Closed: no change will follow.
	Closed bool
	// Changed is closed at the next change.
	Changed <-chan struct{}
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
	dir := s.ingestDir(d)
	s.mu.Lock()
	for {
		// GC removing an idle partial of this digest for space: wait.
		gone, ok := s.removing[dir]
		if !ok {
			break
		}
		s.mu.Unlock()
		select {
		case <-gone:
		case <-ctx.Done():
			return nil, fmt.Errorf("blobstore: ingest %s: %w", d, ctx.Err())
		}
		s.mu.Lock()
	}
	if _, ok := s.partials[d]; ok {
		s.mu.Unlock()
		return nil, fmt.Errorf("blobstore: ingest %s: %w", d, ErrBusy)
	}
	p := &Partial{s: s, digest: d, plan: plan, dir: dir, changed: make(chan struct{})}
	s.partials[d] = p
	s.mu.Unlock()

	if err := p.open(ctx); err != nil {
		p.closeFiles()
		// Still ours: give back what was reserved beyond the pieces
		// written (a resumed partial keeps them).
		if _, serr := shrinkDir(p.dir); serr != nil && !errors.Is(serr, errors.ErrUnsupported) {
			s.log.Warn("giving back the space of a partial blob that failed to open", "digest", d, "err", serr)
		}
		s.mu.Lock()
		delete(s.partials, d)
		s.mu.Unlock()
		return nil, err
	}
	return p, nil
}

func (p *Partial) open(ctx context.Context) error {
	n := p.plan.Count()
	p.done = make([]bool, n)
	p.crc = make([]uint32, n)
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
	// What is to be reserved: the blob, less what a resumed partial still
	// holds (the pieces it wrote; the rest was given back when it stopped).
	need := p.plan.Size
	if fi, err := p.data.Stat(); err == nil && resume {
		need -= min(allocatedBytes(fi), need)
	}
	// Checked before anything is reserved, so that one blob cannot take
	// the last of the disk from everything else on the node. Partial blobs
	// no download uses go first, oldest first.
	if free, err := freeBytes(p.dir); err == nil && free < need {
		p.s.reclaimPartials(need)
		if free, err = freeBytes(p.dir); err == nil && free < need {
			return p.s.noSpace(p.digest.String(), need, fmt.Errorf("%d bytes free", free))
		}
	}
	if err := p.data.Truncate(p.plan.Size); err != nil {
		return fmt.Errorf("blobstore: size partial data: %w", err)
	}
	err = allocate(p.data, p.plan.Size)
	if errors.Is(err, syscall.ENOSPC) {
		if n, _ := p.s.reclaimPartials(need); n > 0 {
			err = allocate(p.data, p.plan.Size)
		}
	}
	if err != nil {
		if errors.Is(err, syscall.ENOSPC) {
			return p.s.noSpace(p.digest.String(), need, err)
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
		p.done[i], p.crc[i] = true, want
		p.ndone++
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

// Pieces returns copies of the done flags and the checksums (zero where not
// done), taken together.
func (p *Partial) Pieces() (done []bool, crc []uint32) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.done), slices.Clone(p.crc)
}

// Changed returns a channel closed at the next change: a piece done, Reset,
// Commit sealing or completing the blob, Close. Once the partial is closed
// it returns a closed channel.
func (p *Partial) Changed() <-chan struct{} {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.changed
}

// StateAt returns the partial's state as a reader at off sees it.
func (p *Partial) StateAt(off int64) State {
	p.mu.Lock()
	defer p.mu.Unlock()
	st := State{End: off, Sealed: p.sealed, Resets: p.resets, Closed: p.closed, Changed: p.changed}
	if off >= p.plan.Size {
		st.End = p.plan.Size
		return st
	}
	j := p.plan.Index(off)
	for j < len(p.done) && p.done[j] {
		j++
	}
	if j > p.plan.Index(off) {
		st.End, _ = p.plan.Range(j)
		if j >= len(p.done) {
			st.End = p.plan.Size
		}
	}
	return st
}

// notifyLocked wakes everyone waiting on Changed.
func (p *Partial) notifyLocked() {
	close(p.changed)
	if !p.closed {
		p.changed = make(chan struct{})
	}
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
		// A full buffer a write: a TLS stream reads a record (16 KiB) at a
		// time, and a write and checksum per record cost more than the copy.
		m, err := io.ReadFull(r, buf)
		if err == io.ErrUnexpectedEOF {
			err = io.EOF
		}
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
		return false, fmt.Errorf("blobstore: mark piece %d: partial closed", i)
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
	p.done[i], p.crc[i] = true, crc
	p.ndone++
	p.notifyLocked()
	return true, nil
}

// Reset forgets every piece, for a blob whose bytes failed verification.
func (p *Partial) Reset() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return fmt.Errorf("blobstore: reset %s: partial closed", p.digest)
	}
	for i := range p.done {
		p.done[i], p.crc[i] = false, 0
	}
	p.ndone = 0
	p.resets++
	p.notifyLocked()
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
	if p.closed || p.committed || p.committing {
		return fmt.Errorf("blobstore: commit %s: partial closed", p.digest)
	}
	if p.ndone != len(p.done) {
		return fmt.Errorf("blobstore: commit %s: %d of %d pieces done", p.digest, p.ndone, len(p.done))
	}
	// Every piece is written: the data syncs without the lock, so peers
	// keep opening pieces (OpenData) and watching them meanwhile. On a busy
	// disk the sync takes seconds, and held through it the lock left every
	// peer asking this node for a piece waiting (docs/benchmarks/notebook.md).
	p.committing = true
	p.sealed = true
	p.notifyLocked()
	p.mu.Unlock()
	err := p.s.syncData(p.data)
	p.mu.Lock()
	p.committing = false
	if err != nil {
		return fmt.Errorf("blobstore: commit %s: sync: %w", p.digest, err)
	}
	if p.closed {
		return fmt.Errorf("blobstore: commit %s: partial closed while syncing", p.digest)
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
	p.notifyLocked()
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
	if ext := p.s.opts.External; ext != nil {
		if size, ok := ext.Stat(p.digest); ok && size == p.plan.Size {
			p.s.kick(p.s.shadowKick)
		}
	}
	return nil
}

// Discard closes the partial blob and deletes its files.
func (p *Partial) Discard() error {
	p.close(false)
	if p.committed {
		return nil
	}
	if err := os.RemoveAll(p.dir); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("blobstore: discard %s: %w", p.digest, err)
	}
	return nil
}

// Close releases the partial blob; an uncommitted one stays on disk to
// resume, holding the pieces it wrote: the space reserved for the others
// is given back.
func (p *Partial) Close() { p.close(true) }

func (p *Partial) close(keep bool) {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	p.closed = true
	p.notifyLocked()
	// Closed: no piece is marked done from here on.
	done := p.done
	release := keep && !p.committed && !p.committing && p.ndone < len(p.done)
	p.mu.Unlock()
	if release {
		span, err := releaseUnwritten(p.data, p.plan, func(i int) bool { return done[i] })
		switch {
		case err == nil:
			p.s.log.Debug("stopped partial blob gave back its unwritten space", "digest", p.digest, "size", p.plan.Size, "released", span)
		case !errors.Is(err, errors.ErrUnsupported):
			p.s.log.Warn("giving back the unwritten space of a partial blob", "digest", p.digest, "err", err)
		}
	}
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
