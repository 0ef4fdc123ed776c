package report

import (
	"os"
	"strings"
	"testing"
)

func run(mode string, repeat int, secs ...float64) Run {
	r := Run{Scenario: "a", Mode: mode, Repeat: repeat, Nodes: len(secs), Size: 64 << 20, NodeBps: 25e6, OriginBps: 25e6,
		Seconds: map[string]float64{}, Bound: 2, UpstreamDone: 2.2, ProxiesDone: 3, Egress: 64 << 20, PieceSize: 4 << 20,
		BySource: map[string]int64{"upstream": 64 << 20, "peer": 128 << 20}, ByParent: map[string]int64{"upstream": 64 << 20, "n1": 8 << 20}}
	for i, s := range secs {
		r.Seconds[string(rune('a'+i))] = s
	}
	r.Finish()
	return r
}

func TestFinish(t *testing.T) {
	r := run("state", 0, 4, 1, 3, 2)
	if r.P50 != 2 || r.Max != 4 || r.MaxOver != 2 || r.EgressX != 1 || r.Pieces["upstream"] != 16 || r.Pieces["n1"] != 2 {
		t.Fatalf("%+v", r)
	}
}

func TestSummaryAndPlots(t *testing.T) {
	runs := []Run{
		run("state", 0, 2, 3), run("fcfs", 0, 4, 6), run("direct", 0, 8, 9),
		run("state", 1, 2, 5), run("fcfs", 1, 5, 10), run("direct", 1, 8, 9),
		run("state", 2, 3, 4), run("fcfs", 2, 4, 8), run("direct", 2, 9, 9),
	}
	md := Summary(runs)
	for _, want := range []string{
		"| state | 3 | 2.00 | 4.00 | 4.00 | 4.00 | 2.00 | 2.00 | 1.10 | 1.50 | 1.000 | 66.7% | 0% |",
		"- fcfs ÷ state, p99: median 2.00× (runs: 2.00, 2.00, 2.00)",
		"- direct ÷ state, max: median 2.25× (runs: 1.80, 2.25, 3.00)",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("summary lacks %q:\n%s", want, md)
		}
	}
	dir := t.TempDir()
	files, err := Plots(dir, runs)
	if err != nil {
		t.Fatal(err)
	}
	if len(files) != 4 {
		t.Fatalf("files %v", files)
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil || len(b) < 500 {
			t.Errorf("%s: %d bytes, %v", f, len(b), err)
		}
		if strings.HasSuffix(f, ".svg") && !strings.Contains(string(b[:200]), "<svg") {
			t.Errorf("%s is not SVG", f)
		}
	}
}
