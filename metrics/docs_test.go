package metrics

import (
	"bufio"
	"fmt"
	"maps"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

// docLabel is a label as docs/metrics.md lists it: its values when it
// takes a fixed set of them, nil when any value.
type docLabel struct {
	name   string
	values []string
}

var (
	docRowRe   = regexp.MustCompile("^\\| `(registry_proxy_[a-z_]+)` \\| ([a-z]+) \\|([^|]*)\\|")
	docLabelRe = regexp.MustCompile("^`([a-z_]+)`(?::\\s*(.+))?$")
	docValueRe = regexp.MustCompile("^`([^`]+)`$")
	helpSetRe  = regexp.MustCompile(`\[([a-z_]+): ([^\]]*)\]`)
)

// withoutParens drops what parentheses enclose: remarks, not values.
func withoutParens(s string) string {
	var b strings.Builder
	depth := 0
	for _, r := range s {
		switch {
		case r == '(':
			depth++
		case r == ')' && depth > 0:
			depth--
		case depth == 0:
			b.WriteRune(r)
		}
	}
	return b.String()
}

// parseDocLabels reads a Labels cell: entries separated by ";", each
// "`label`" or "`label`: `v1`, `v2`", remarks in parentheses.
func parseDocLabels(cell string) ([]docLabel, error) {
	var out []docLabel
	cell = strings.TrimSpace(withoutParens(cell))
	if cell == "" {
		return nil, nil
	}
	for _, e := range strings.Split(cell, ";") {
		m := docLabelRe.FindStringSubmatch(strings.TrimSpace(e))
		if m == nil {
			return nil, fmt.Errorf("label entry %q: want `label` or `label`: `v1`, `v2`", strings.TrimSpace(e))
		}
		l := docLabel{name: m[1]}
		if m[2] != "" {
			for _, v := range strings.Split(m[2], ",") {
				vm := docValueRe.FindStringSubmatch(strings.TrimSpace(v))
				if vm == nil {
					return nil, fmt.Errorf("label %s: value %q not in backquotes", l.name, strings.TrimSpace(v))
				}
				l.values = append(l.values, vm[1])
			}
		}
		out = append(out, l)
	}
	return out, nil
}

// docMetrics reads the tables of docs/metrics.md: each metric's labels.
func docMetrics(t *testing.T) map[string][]docLabel {
	t.Helper()
	f, err := os.Open("../docs/metrics.md")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string][]docLabel{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		if !strings.HasPrefix(sc.Text(), "| `registry_proxy_") {
			continue
		}
		m := docRowRe.FindStringSubmatch(sc.Text())
		if m == nil {
			t.Errorf("docs/metrics.md: row not read: %s", sc.Text())
			continue
		}
		labels, err := parseDocLabels(m[3])
		if err != nil {
			t.Errorf("docs/metrics.md, %s: %v", m[1], err)
		}
		if _, dup := out[m[1]]; dup {
			t.Errorf("docs/metrics.md lists %s twice", m[1])
		}
		out[m[1]] = labels
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// registered is a registered family: its HELP text and label names.
type registered struct {
	help   string
	labels []string
}

// registeredFamilies reads every registered descriptor of m, vectors with
// no series yet included.
func registeredFamilies(t *testing.T, m *Metrics) map[string]registered {
	t.Helper()
	ch := make(chan *prometheus.Desc)
	go func() {
		m.reg.Describe(ch)
		close(ch)
	}()
	out := map[string]registered{}
	for d := range ch {
		// A Desc shows its parts only in String():
		// Desc{fqName: "n", help: "h", unit: "", constLabels: {}, variableLabels: {a,b}}
		s := d.String()
		name, help, rest, err := descParts(s)
		if err != nil {
			t.Fatalf("%s: %v", s, err)
		}
		_, vl, ok := strings.Cut(rest, "variableLabels: {")
		if !ok {
			t.Fatalf("%s: no variableLabels", s)
		}
		var labels []string
		if vl = strings.TrimSuffix(vl, "}}"); vl != "" {
			labels = strings.Split(vl, ",")
		}
		out[name] = registered{help: help, labels: labels}
	}
	return out
}

func descParts(s string) (name, help, rest string, err error) {
	rest, ok := strings.CutPrefix(s, "Desc{fqName: ")
	if !ok {
		return "", "", "", fmt.Errorf("no fqName")
	}
	q, err := strconv.QuotedPrefix(rest)
	if err != nil {
		return "", "", "", err
	}
	name, _ = strconv.Unquote(q)
	if rest, ok = strings.CutPrefix(rest[len(q):], ", help: "); !ok {
		return "", "", "", fmt.Errorf("no help")
	}
	if q, err = strconv.QuotedPrefix(rest); err != nil {
		return "", "", "", err
	}
	help, _ = strconv.Unquote(q)
	return name, help, rest[len(q):], nil
}

// helpValues reads the "[label: v1, v2]" sets a HELP text ends with.
func helpValues(help string) map[string][]string {
	out := map[string][]string{}
	for _, m := range helpSetRe.FindAllStringSubmatch(help, -1) {
		for _, v := range strings.Split(m[2], ",") {
			out[m[1]] = append(out[m[1]], strings.TrimSpace(v))
		}
	}
	return out
}

// Every registered family with labels is in docs/metrics.md with the same
// labels, and each label with a fixed set of values has the same set in
// the HELP text as in the docs, both ways: neither can list a value the
// other lacks.
func TestHelpMatchesDocs(t *testing.T) {
	m := New("test")
	m.ParentWeights(func() map[string]float64 { return nil })
	fams := registeredFamilies(t, m)
	docs := docMetrics(t)
	if len(docs) == 0 {
		t.Fatal("no metric read from docs/metrics.md")
	}
	for _, name := range slices.Sorted(maps.Keys(fams)) {
		f := fams[name]
		if !strings.HasPrefix(name, ns+"_") {
			continue
		}
		dl, ok := docs[name]
		if !ok {
			t.Errorf("%s is registered, not in docs/metrics.md", name)
			continue
		}
		var docNames []string
		for _, l := range dl {
			docNames = append(docNames, l.name)
		}
		if !sameSet(docNames, f.labels) {
			t.Errorf("%s: labels %v in docs/metrics.md, %v registered", name, docNames, f.labels)
		}
		hv := helpValues(f.help)
		for l := range hv {
			if !slices.Contains(f.labels, l) {
				t.Errorf("%s: HELP lists values of %s, not one of its labels %v", name, l, f.labels)
			}
		}
		for _, l := range dl {
			h, inHelp := hv[l.name]
			switch {
			case l.values == nil && inHelp:
				t.Errorf("%s: HELP lists %s's values %v, docs/metrics.md none", name, l.name, h)
			case l.values != nil && !inHelp:
				t.Errorf("%s: docs/metrics.md lists %s's values %v, the HELP text none (end it with \"[%s: ...]\"): %q", name, l.name, l.values, l.name, f.help)
			case !sameSet(l.values, h):
				t.Errorf("%s: %s's values are %v in docs/metrics.md, %v in the HELP text", name, l.name, l.values, h)
			}
		}
	}
	// A metric registered elsewhere (the node's gauges) has no labels; one
	// the docs give labels must be one of these.
	for name, dl := range docs {
		if _, ok := fams[name]; !ok && len(dl) > 0 {
			t.Errorf("docs/metrics.md lists %s with labels; no such family is registered", name)
		}
	}
}

// sameSet: the same values, each as often, in any order.
func sameSet(a, b []string) bool {
	return slices.Equal(slices.Sorted(slices.Values(a)), slices.Sorted(slices.Values(b)))
}

// The test's parsers read what they should, and reject what breaks the
// format, so a drift cannot pass by being unreadable.
func TestDocLabelParsing(t *testing.T) {
	for _, tc := range []struct {
		cell string
		want []docLabel
		bad  bool
	}{
		{"", nil, false},
		{"`source`: `cache`, `peer`", []docLabel{{"source", []string{"cache", "peer"}}}, false},
		{"`provider` (its name, `x`); `result`: `ok`, `failed`", []docLabel{{"provider", nil}, {"result", []string{"ok", "failed"}}}, false},
		{"`method`: `GET`, `other` (any other); `code`", []docLabel{{"method", []string{"GET", "other"}}, {"code", nil}}, false},
		{"`provider`, `result`: `ok`", nil, true},
		{"`result`: ok, failed", nil, true},
	} {
		got, err := parseDocLabels(tc.cell)
		if (err != nil) != tc.bad || !tc.bad && !slices.EqualFunc(got, tc.want, func(a, b docLabel) bool { return a.name == b.name && slices.Equal(a.values, b.values) }) {
			t.Errorf("parseDocLabels(%q) = %v, %v; want %v (error: %v)", tc.cell, got, err, tc.want, tc.bad)
		}
	}
	got := helpValues("Piece fetches (busy: full). [parent: peer, upstream] [result: ok, busy]")
	if !slices.Equal(got["parent"], []string{"peer", "upstream"}) || !slices.Equal(got["result"], []string{"ok", "busy"}) || len(got) != 2 {
		t.Errorf("helpValues: %v", got)
	}
}
