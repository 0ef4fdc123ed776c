// Package piece cuts a blob into pieces. Every node derives the same plan from
// the blob size alone, so pieces fetched from different parents line up.
package piece

import (
	"encoding/base64"
	"errors"
	"fmt"
	"hash/crc32"
	"math/bits"
)

const (
	// MinSize is the smallest piece unless a cluster sets another
	// (pieces.min_size).
	MinSize int64 = 1 << 20
	// LeastMin is the smallest MinSize a cluster may choose.
	LeastMin int64 = 256 << 10
	// MaxSize is the largest piece, so one slow piece never holds back much.
	MaxSize int64 = 64 << 20
	// AimCount and AimSize: pieces grow from the smallest while a blob has
	// more than AimCount of them and they are under AimSize. A node passes a
	// piece on only once it holds it whole, so a pull ends about a few piece
	// times after the bound: with fewer pieces each is a larger share of the
	// blob; with smaller ones each request costs more against its transfer
	// time. 256 pieces of at most 4 MiB beat 64 of 4 MiB (256 MiB on 25 MB/s
	// links, the namespace harness; 256 MB on 300 MB/s, the simulator) and
	// 954 of 1 MiB (1 GB on 300 MB/s); docs/benchmarks/notebook.md.
	AimCount       = 256
	AimSize  int64 = 4 << 20
	// MaxCount is the number of pieces beyond which pieces grow whatever
	// their size; it bounds the size of bitmaps and metadata messages.
	MaxCount = 1024
)

// Plan is the piece layout of one blob.
type Plan struct {
	Size      int64 // blob size in bytes
	PieceSize int64 // size of every piece but the last
}

// PlanFor returns the plan for a blob of the given size with the default
// MinSize (Planner.For).
func PlanFor(size int64) Plan { return Planner{}.For(size) }

// Planner derives plans with a cluster's smallest piece. Every node of a
// cluster must use the same: a node with another plan of a blob cannot
// use its peers' pieces of it.
type Planner struct {
	Min int64 // the smallest piece, a power of two in [LeastMin, MaxSize]; 0: MinSize
}

// For returns the plan for a blob of the given size: Min pieces, doubled
// while there are more than AimCount of them under AimSize and while there
// are more than MaxCount, capped at MaxSize.
func (pl Planner) For(size int64) Plan {
	if size < 0 {
		size = 0
	}
	p := Plan{Size: size, PieceSize: min(pl.Min, MaxSize)}
	if p.PieceSize <= 0 {
		p.PieceSize = MinSize
	}
	for p.PieceSize < AimSize && p.Count() > AimCount {
		p.PieceSize *= 2
	}
	for p.PieceSize < MaxSize && p.Count() > MaxCount {
		p.PieceSize *= 2
	}
	return p
}

// Count is the number of pieces. An empty blob has one empty piece so that it
// flows through the same machinery as any other.
func (p Plan) Count() int {
	if p.Size == 0 {
		return 1
	}
	return int((p.Size + p.PieceSize - 1) / p.PieceSize)
}

// Range returns the offset and length of piece i.
func (p Plan) Range(i int) (off, n int64) {
	off = int64(i) * p.PieceSize
	n = p.PieceSize
	if off+n > p.Size {
		n = p.Size - off
	}
	return off, n
}

// Index returns the piece that holds byte off.
func (p Plan) Index(off int64) int {
	return int(off / p.PieceSize)
}

// ValidMin reports whether min may be a cluster's smallest piece.
func ValidMin(min int64) error {
	if min < LeastMin || min > MaxSize || bits.OnesCount64(uint64(min)) != 1 {
		return fmt.Errorf("smallest piece %d: want a power of two from %d to %d", min, LeastMin, MaxSize)
	}
	return nil
}

// Validate reports whether the plan is one a node derives for its blob size
// with some valid smallest piece.
func (p Plan) Validate() error {
	if err := ValidMin(p.PieceSize); err != nil {
		return fmt.Errorf("piece plan %d/%d: %w", p.Size, p.PieceSize, err)
	}
	if want := (Planner{Min: p.PieceSize}).For(p.Size); want != p {
		return fmt.Errorf("piece plan %d/%d: want piece size %d for that blob size", p.Size, p.PieceSize, want.PieceSize)
	}
	return nil
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// NewChecksum returns the per-piece checksum hash (CRC-32C, done in hardware on
// amd64 and arm64). It catches torn writes and transport corruption; the whole-blob
// digest is what establishes trust.
func NewChecksum() interface {
	Write([]byte) (int, error)
	Sum32() uint32
	Reset()
} {
	return crc32.New(castagnoli)
}

// Checksum returns the piece checksum of b.
func Checksum(b []byte) uint32 { return crc32.Checksum(b, castagnoli) }

// EncodeSet writes a set of pieces (set[i]: piece i is in it) as unpadded
// base64url of a bitmap, bit i%8 of byte i/8: 172 characters for 1,024
// pieces, the most a blob under 64 GiB has, small enough for a header.
func EncodeSet(set []bool) string {
	b := make([]byte, (len(set)+7)/8)
	for i, in := range set {
		if in {
			b[i/8] |= 1 << (i % 8)
		}
	}
	return base64.RawURLEncoding.EncodeToString(b)
}

// ErrBadSet means a piece set does not decode to the blob's pieces.
var ErrBadSet = errors.New("piece: malformed piece set")

// DecodeSet reads what EncodeSet wrote for a blob of count pieces. It
// refuses a bitmap of another length or with bits past the last piece: a
// peer's claim about another blob, or garbage.
func DecodeSet(s string, count int) ([]bool, error) {
	if count < 0 || len(s) != base64.RawURLEncoding.EncodedLen((count+7)/8) {
		return nil, fmt.Errorf("%w: %d characters for %d pieces", ErrBadSet, len(s), count)
	}
	b, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadSet, err)
	}
	if len(b) != (count+7)/8 { // the decoder skips line breaks
		return nil, fmt.Errorf("%w: %d bytes for %d pieces", ErrBadSet, len(b), count)
	}
	if count%8 != 0 && b[len(b)-1]>>(count%8) != 0 {
		return nil, fmt.Errorf("%w: pieces past the last of %d", ErrBadSet, count)
	}
	set := make([]bool, count)
	for i := range set {
		set[i] = b[i/8]&(1<<(i%8)) != 0
	}
	return set, nil
}
