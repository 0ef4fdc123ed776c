package config

import (
	"bufio"
	"flag"
	"fmt"
	"os"
	"regexp"
	"strings"
	"testing"
)

var updateDocs = flag.Bool("update-docs", false, "rewrite docs/configuration.md from config.toml")

// refTable is one TOML table of config.toml: what its comments say and its
// keys.
type refTable struct {
	name, doc string
	examples  []string // commented-out lines showing the table's entries
	keys      []refKey
}

type refKey struct{ name, value, doc string }

var (
	headerRe = regexp.MustCompile(`^\[([a-z0-9_.]+)\]$`)
	keyRe    = regexp.MustCompile(`^([a-z0-9_]+) = (.*)$`)
	// A commented-out entry: [table], key = value or "quoted key" = value.
	exampleRe = regexp.MustCompile(`^(\[.*\]|("[^"]+"|[a-z0-9_]+) = .*)$`)
	flagRe    = regexp.MustCompile(`\s*Flags?: (--[a-z-]+)[^.]*\.?`)
)

// parseReference reads config.toml: comment blocks belong to the key or
// table header that follows them.
func parseReference(t *testing.T) []refTable {
	t.Helper()
	f, err := os.Open("../config.toml")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tables := []refTable{{name: ""}}
	var comment []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case strings.HasPrefix(line, "#"):
			comment = append(comment, strings.TrimSpace(strings.TrimPrefix(line, "#")))
		case line == "":
			if len(tables) == 1 && len(tables[0].keys) == 0 && tables[0].doc == "" {
				tables[0].doc = strings.Join(comment, "\n") // the file's preamble
				comment = nil
			}
		case headerRe.MatchString(line):
			// Commented-out entries just above a header show the previous
			// table's; the prose is the new table's.
			var prose []string
			for _, c := range comment {
				if exampleRe.MatchString(c) {
					tables[len(tables)-1].examples = append(tables[len(tables)-1].examples, c)
				} else {
					prose = append(prose, c)
				}
			}
			tables = append(tables, refTable{name: headerRe.FindStringSubmatch(line)[1], doc: strings.Join(prose, " ")})
			comment = nil
		case keyRe.MatchString(line):
			m := keyRe.FindStringSubmatch(line)
			cur := &tables[len(tables)-1]
			cur.keys = append(cur.keys, refKey{name: m[1], value: m[2], doc: strings.Join(comment, " ")})
			comment = nil
		default:
			t.Fatalf("config.toml: cannot read %q", line)
		}
	}
	return tables
}

func fullKey(table, key string) string {
	if table == "" {
		return key
	}
	return table + "." + key
}

// Every key of Config is in config.toml, so the file documents them all.
func TestEveryKeyDocumented(t *testing.T) {
	documented := map[string]bool{}
	for _, tb := range parseReference(t) {
		documented[tb.name] = true
		for _, k := range tb.keys {
			documented[fullKey(tb.name, k.name)] = true
		}
	}
	for _, key := range Keys() {
		if !documented[key] {
			t.Errorf("%s is not in config.toml", key)
		}
	}
}

// docs/configuration.md is config.toml as a reference: generated from it,
// so the two cannot disagree.
func TestConfigurationReference(t *testing.T) {
	var b strings.Builder
	b.WriteString("# Configuration reference\n\n")
	b.WriteString("Generated from [`config.toml`](../config.toml) (`go test ./config -update-docs`), which is the one place the keys are documented and shows every default. ")
	b.WriteString("`registry-proxy serve --config FILE` reads a file of the same form; keys left out keep their defaults, and an unknown key is an error. ")
	b.WriteString("Flags override the keys they name. `SIGHUP` re-reads the file; `shutdown_timeout` below says which keys apply without a restart.\n")
	for _, tb := range parseReference(t) {
		if tb.name == "" {
			b.WriteString("\n## Top level\n\n")
		} else {
			fmt.Fprintf(&b, "\n## [%s]\n\n", tb.name)
			if tb.doc != "" {
				b.WriteString(tb.doc + "\n\n")
			}
		}
		if len(tb.examples) > 0 {
			b.WriteString("```toml\n" + strings.Join(tb.examples, "\n") + "\n```\n\n")
		}
		if len(tb.keys) == 0 {
			continue
		}
		b.WriteString("| Key | Default | Flag | Meaning |\n|---|---|---|---|\n")
		for _, k := range tb.keys {
			fl := ""
			if m := flagRe.FindStringSubmatch(k.doc); m != nil {
				fl = "`" + m[1] + "`"
			}
			doc := strings.TrimSpace(flagRe.ReplaceAllString(k.doc, ""))
			if doc == "" {
				doc = "See the table's description."
			}
			fmt.Fprintf(&b, "| `%s` | `%s` | %s | %s |\n", fullKey(tb.name, k.name), strings.ReplaceAll(k.value, "|", "\\|"), fl, strings.ReplaceAll(doc, "|", "\\|"))
		}
	}
	const path = "../docs/configuration.md"
	if *updateDocs {
		if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != b.String() {
		t.Errorf("%s is not config.toml's reference: go test ./config -update-docs", path)
	}
}
