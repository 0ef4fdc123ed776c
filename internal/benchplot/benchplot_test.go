package benchplot

import (
	"image/png"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const header = "plot\tx\tseries\tstat\tvalue\tlow\thigh\truns\tdate\tmachine\n"

func TestRead(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		want     []string // each figure's Label, or nil for an error
		err      string
	}{
		{
			name: "comments, a value, a range, both",
			in: "# a comment\n\n" + header +
				"cluster\ta\tstate\tmax ÷ bound\t1.24\t1.18\t1.43\t23\t2026-12-07\tM2\n" +
				"single\twarm\t\t÷ direct\t\t0.84\t0.90\t3\t2026-12-07\tM2\n" +
				"sim\t2600\tKraken, published\tp99 ÷ bound\t1.8\t\t\t1\t\t\n",
			want: []string{"1.24 (1.18–1.43)", "0.84–0.90", "1.8"},
		},
		{name: "no header", in: "cluster\ta\ts\tmax\t1\t\t\t1\t\t\n", err: "header"},
		{name: "empty", in: "# only a comment\n", err: "no header"},
		{name: "unknown plot", in: header + "bars\ta\ts\tmax\t1\t\t\t1\t\t\n", err: "plot \"bars\""},
		{name: "too few fields", in: header + "cluster\ta\ts\tmax\t1\n", err: "fields"},
		{name: "nothing to draw", in: header + "cluster\ta\ts\tmax\t\t\t\t1\t\t\n", err: "neither"},
		{name: "low without high", in: header + "cluster\ta\ts\tmax\t\t1.2\t\t1\t\t\n", err: "together"},
		{name: "low above high", in: header + "cluster\ta\ts\tmax\t\t1.5\t1.2\t2\t\t\n", err: "above"},
		{name: "not a number", in: header + "cluster\ta\ts\tmax\t1,24\t\t\t1\t\t\n", err: "value"},
		{name: "zero on a log axis", in: header + "single\ta\t\tmax\t0\t\t\t1\t\t\n", err: "positive"},
		{name: "no runs", in: header + "cluster\ta\ts\tmax\t1\t\t\t0\t\t\n", err: "runs"},
		{name: "sim node count", in: header + "sim\tmany\ts\tp99\t1.2\t\t\t1\t\t\n", err: "node count"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			figs, err := Read(strings.NewReader(tc.in))
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("Read: %v, want an error with %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, f := range figs {
				got = append(got, f.Label())
			}
			if strings.Join(got, "|") != strings.Join(tc.want, "|") {
				t.Fatalf("labels %q, want %q", got, tc.want)
			}
		})
	}
}

func TestWriteDrawsEachPlot(t *testing.T) {
	figs, err := Read(strings.NewReader(header +
		"single\tcold\t\t÷ direct\t\t0.15\t0.20\t3\t2026-12-07\tM2\n" +
		"cluster\ta\tstate\tmax ÷ bound\t1.24\t1.18\t1.43\t23\t2026-12-07\tM2\n" +
		"cluster\ta\tfcfs\tmax ÷ bound\t\t2.13\t2.68\t3\t2026-11-27\tM2\n" +
		"sim\t2600\tequal\tp50 ÷ bound\t1.20\t1.19\t1.20\t2\t2026-12-07\tM2\n" +
		"sim\t2600\tKraken, published\tp99 ÷ bound\t1.8\t\t\t1\t\t\n"))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	files, err := Write(dir, figs)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{FileSingle, FileCluster, FileSim}
	if len(files) != len(want) {
		t.Fatalf("wrote %q, want %q", files, want)
	}
	for i, name := range want {
		if files[i] != filepath.Join(dir, name) {
			t.Fatalf("file %d is %s, want %s", i, files[i], name)
		}
		f, err := os.Open(files[i])
		if err != nil {
			t.Fatal(err)
		}
		img, err := png.Decode(f)
		f.Close()
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if b := img.Bounds(); b.Dx() != 960 || b.Dy() != 540 {
			t.Fatalf("%s is %v, want 960 × 540", name, b)
		}
	}

	// A plot without figures is not drawn.
	files, err = Write(t.TempDir(), figs[:1])
	if err != nil || len(files) != 1 || filepath.Base(files[0]) != FileSingle {
		t.Fatalf("single only: %q, %v", files, err)
	}
}

// TestHeadlineFileMatchesPage holds docs/benchmarks.md to the data file its
// plots are drawn from: every figure of the file is on the page as written.
func TestHeadlineFileMatchesPage(t *testing.T) {
	data, err := os.Open("../../docs/benchmarks/headline.tsv")
	if err != nil {
		t.Fatal(err)
	}
	defer data.Close()
	figs, err := Read(data)
	if err != nil {
		t.Fatal(err)
	}
	page, err := os.ReadFile("../../docs/benchmarks.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range figs {
		var texts []string
		if f.HasValue() {
			texts = append(texts, f.Value)
		}
		if f.HasRange() {
			texts = append(texts, f.Low+"–"+f.High)
		}
		for _, s := range texts {
			if !strings.Contains(string(page), s) {
				t.Errorf("%s %s %s %s: %q is not on docs/benchmarks.md", f.Plot, f.X, f.Series, f.Stat, s)
			}
		}
	}
}
