package piece

import (
	"errors"
	"math/rand/v2"
	"slices"
	"testing"
)

func TestPlanFor(t *testing.T) {
	tests := []struct {
		size      int64
		pieceSize int64
		count     int
	}{
		{0, MinSize, 1},
		{1, MinSize, 1},
		{MinSize, MinSize, 1},
		{MinSize + 1, MinSize, 2},
		{256 << 20, 1 << 20, 256},
		{256<<20 + 1, 2 << 20, 129},
		{1 << 30, 4 << 20, 256},
		{4 << 30, 4 << 20, 1024},
		{4<<30 + 1, 8 << 20, 513},
		{200 << 30, MaxSize, 3200},
	}
	for _, tt := range tests {
		p := PlanFor(tt.size)
		if p.PieceSize != tt.pieceSize || p.Count() != tt.count {
			t.Errorf("PlanFor(%d) = piece %d count %d, want %d/%d", tt.size, p.PieceSize, p.Count(), tt.pieceSize, tt.count)
		}
		if err := p.Validate(); err != nil {
			t.Errorf("Validate: %v", err)
		}
		var sum int64
		for i := 0; i < p.Count(); i++ {
			off, n := p.Range(i)
			if off != sum || n < 0 || n > p.PieceSize {
				t.Fatalf("size %d piece %d: off %d n %d", tt.size, i, off, n)
			}
			if n > 0 && p.Index(off+n-1) != i {
				t.Fatalf("Index(%d) != %d", off+n-1, i)
			}
			sum += n
		}
		if sum != tt.size {
			t.Errorf("size %d: pieces sum to %d", tt.size, sum)
		}
	}
	if err := (Plan{Size: 10, PieceSize: 1}).Validate(); err == nil {
		t.Error("Validate accepted a foreign piece size")
	}
}

// Pieces grow from a cluster's smallest piece to AimCount of them while
// under AimSize, then beyond MaxCount, whatever the smallest piece. Every
// plan a valid Planner makes validates; plans no Planner makes do not.
func TestPlanner(t *testing.T) {
	for _, tt := range []struct {
		min, size, pieceSize int64
	}{
		{0, 1 << 30, 4 << 20},
		{1 << 20, 0, 1 << 20},
		{1 << 20, 1 << 30, 4 << 20},
		{1 << 20, 3 << 30, 4 << 20},
		{LeastMin, 8 << 20, 256 << 10},
		{LeastMin, 64 << 20, 256 << 10},
		{LeastMin, 64<<20 + 1, 512 << 10},
		{LeastMin, 1 << 30, 4 << 20},
		{8 << 20, 1 << 30, 8 << 20},
		{8 << 20, 16 << 30, 16 << 20},
		{LeastMin, 200 << 30, MaxSize},
		{MaxSize, 1, MaxSize},
	} {
		p := Planner{Min: tt.min}.For(tt.size)
		if p.PieceSize != tt.pieceSize || p.Size != tt.size {
			t.Errorf("Planner{%d}.For(%d) = %d/%d, want piece size %d", tt.min, tt.size, p.Size, p.PieceSize, tt.pieceSize)
		}
		if err := p.Validate(); err != nil {
			t.Errorf("Planner{%d}.For(%d): %v", tt.min, tt.size, err)
		}
	}
	// Whatever the smallest piece and the size, the plan validates.
	for _, min := range []int64{LeastMin, 512 << 10, 1 << 20, 2 << 20, 4 << 20, 8 << 20, MaxSize} {
		for size := int64(1); size < 300<<30; size = size*3 + 7 {
			if err := (Planner{Min: min}).For(size).Validate(); err != nil {
				t.Fatalf("Planner{%d}.For(%d): %v", min, size, err)
			}
		}
	}
	for _, p := range []Plan{
		{Size: 1 << 30, PieceSize: 512 << 10}, // 2,048 pieces: no Planner makes it
		{Size: 1 << 30, PieceSize: 1 << 20},   // 1,024 pieces of under AimSize
		{Size: 8 << 20, PieceSize: 128 << 10}, // below LeastMin
		{Size: 8 << 20, PieceSize: 3 << 20},   // not a power of two
		{Size: 8 << 20, PieceSize: 128 << 20}, // above MaxSize
	} {
		if err := p.Validate(); err == nil {
			t.Errorf("plan %d/%d validated", p.Size, p.PieceSize)
		}
	}
	for _, tt := range []struct {
		min int64
		ok  bool
	}{{LeastMin, true}, {1 << 20, true}, {MaxSize, true}, {0, false}, {128 << 10, false}, {3 << 20, false}, {2 * MaxSize, false}, {-1 << 20, false}} {
		if err := ValidMin(tt.min); (err == nil) != tt.ok {
			t.Errorf("ValidMin(%d) = %v, want ok %v", tt.min, err, tt.ok)
		}
	}
}

func TestSet(t *testing.T) {
	tests := []struct {
		name  string
		set   []bool
		count int
		err   bool
	}{
		{"empty", []bool{}, 0, false},
		{"one of one", []bool{true}, 1, false},
		{"none of nine", make([]bool, 9), 9, false},
		{"a byte's edges", []bool{true, false, false, false, false, false, false, true, true}, 9, false},
		{"fewer pieces than sent", []bool{true, true, true}, 2, true},
		{"more pieces than sent", []bool{true}, 9, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := DecodeSet(EncodeSet(tt.set), tt.count)
			if tt.err {
				if !errors.Is(err, ErrBadSet) {
					t.Fatalf("DecodeSet = %v, %v; want ErrBadSet", got, err)
				}
				return
			}
			if err != nil || !slices.Equal(got, tt.set) {
				t.Fatalf("DecodeSet(EncodeSet(%v)) = %v, %v", tt.set, got, err)
			}
		})
	}
	// Bits past the last piece, in a bitmap of the right length.
	if _, err := DecodeSet("_w", 7); !errors.Is(err, ErrBadSet) {
		t.Errorf("bit 7 of 7 pieces: %v, want ErrBadSet", err)
	}
	if _, err := DecodeSet("!!", 7); !errors.Is(err, ErrBadSet) {
		t.Errorf("not base64: %v, want ErrBadSet", err)
	}
}

// FuzzDecodeSet: a peer's piece set never panics, and what decodes encodes
// back to a set of the same pieces.
func FuzzDecodeSet(f *testing.F) {
	f.Add("_w", 7)
	f.Add("AQ", 9)
	f.Add("", 0)
	f.Fuzz(func(t *testing.T, s string, count int) {
		if count > 1<<16 {
			return
		}
		set, err := DecodeSet(s, count)
		if err != nil {
			return
		}
		if len(set) != count {
			t.Fatalf("%d pieces, want %d", len(set), count)
		}
		again, err := DecodeSet(EncodeSet(set), count)
		if err != nil || !slices.Equal(again, set) {
			t.Fatalf("round trip of %q: %v, %v", s, again, err)
		}
	})
}

// BenchmarkSet is a refusal's offer of a 3 GB blob (716 pieces, about half
// of them in it, at random) written by the parent and read by the child:
// refusals outnumber pieces sent, each carries one.
func BenchmarkSet(b *testing.B) {
	const count = 716
	rng := rand.New(rand.NewPCG(1, 2))
	set := make([]bool, count)
	for i := range set {
		set[i] = rng.IntN(2) == 0
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := DecodeSet(EncodeSet(set), count); err != nil {
			b.Fatal(err)
		}
	}
}
