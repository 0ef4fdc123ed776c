package piece

import "testing"

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
