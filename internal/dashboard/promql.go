package dashboard

import (
	"fmt"
	"slices"
	"strings"
)

// PromQL's functions, aggregation operators and keywords: identifiers that
// are never metric names.
var (
	functions = words(`abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes clamp
		clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year days_in_month deg delta deriv
		double_exponential_smoothing exp floor histogram_avg histogram_count histogram_fraction histogram_quantile
		histogram_stddev histogram_stdvar histogram_sum holt_winters hour idelta increase info irate label_join
		label_replace last_over_time ln log10 log2 mad_over_time max_over_time min_over_time minute month pi
		predict_linear present_over_time quantile_over_time rad rate resets round scalar sgn sin sinh sort
		sort_by_label sort_by_label_desc sort_desc sqrt stddev_over_time stdvar_over_time sum_over_time tan tanh
		time timestamp vector year`)
	aggregations = words(`avg bottomk count count_values group limit_ratio limitk max min quantile stddev stdvar sum topk`)
	// Keywords followed by a list of label names in parentheses.
	labelLists = words(`by without on ignoring group_left group_right`)
	keywords   = words(`bool offset and or unless atan2 start end inf nan`)
)

func words(s string) map[string]bool {
	m := map[string]bool{}
	for _, w := range strings.Fields(s) {
		m[w] = true
	}
	return m
}

// MetricNames returns the metric names expr selects, sorted and once each:
// every identifier that is not a function, an aggregation, a keyword or a
// label name (inside a selector's braces, or in a by/without/on/ignoring/
// group_left/group_right list). Strings, numbers and durations, range and
// subquery brackets, comments and Grafana's variables ($name, ${name},
// [[name]]) are skipped. What it cannot vouch for is an error: an unknown
// function, a selector with no metric name or one by __name__, unbalanced
// brackets or quotes.
func MetricNames(expr string) ([]string, error) {
	var names []string
	s := expr
	i := 0
	for i < len(s) {
		c := s[i]
		switch {
		case c == ' ' || c == '\t' || c == '\n' || c == '\r':
			i++
		case c == '#': // a comment, to the end of the line
			for i < len(s) && s[i] != '\n' {
				i++
			}
		case c == '"' || c == '\'' || c == '`':
			end, err := skipString(s, i)
			if err != nil {
				return nil, err
			}
			i = end
		case c == '$': // a Grafana variable: $name or ${name...}
			i++
			if i < len(s) && s[i] == '{' {
				end := strings.IndexByte(s[i:], '}')
				if end < 0 {
					return nil, fmt.Errorf("promql: unclosed ${ at %d in %q", i-1, expr)
				}
				i += end + 1
				continue
			}
			for i < len(s) && isIdent(s[i], false) {
				i++
			}
		case c == '{':
			// A selector's braces right after a metric name are skipped
			// where the name is read; braces here have no name before them.
			return nil, fmt.Errorf("promql: a selector without a metric name at %d in %q", i, expr)
		case c == '[':
			end, err := skipBalanced(s, i, '[', ']')
			if err != nil {
				return nil, err
			}
			i = end
		case c >= '0' && c <= '9' || c == '.' && i+1 < len(s) && s[i+1] >= '0' && s[i+1] <= '9':
			// A number or a duration: 1, 0.5, 1e3, 0x1f, 5m, 1h30m.
			for i < len(s) && (isIdent(s[i], false) || s[i] == '.') {
				i++
			}
		case isIdent(c, true):
			start := i
			for i < len(s) && isIdent(s[i], false) {
				i++
			}
			word := s[start:i]
			next := skipSpace(s, i)
			lower := strings.ToLower(word)
			switch {
			case labelLists[lower]:
				if next < len(s) && s[next] == '(' {
					end, err := skipBalanced(s, next, '(', ')')
					if err != nil {
						return nil, err
					}
					i = end
				}
			case functions[word], aggregations[lower], keywords[lower]:
				// Functions are case-sensitive; keywords and aggregation
				// operators are not.
			case next < len(s) && s[next] == '(':
				return nil, fmt.Errorf("promql: unknown function %q in %q", word, expr)
			default:
				if next < len(s) && s[next] == '{' {
					end, err := skipBalanced(s, next, '{', '}')
					if err != nil {
						return nil, err
					}
					if strings.Contains(s[next:end], "__name__") {
						return nil, fmt.Errorf("promql: a selector matching __name__ in %q", expr)
					}
					i = end
				}
				if !slices.Contains(names, word) {
					names = append(names, word)
				}
			}
		default: // operators, parentheses, commas, @
			i++
		}
	}
	slices.Sort(names)
	return names, nil
}

// isIdent says whether c may be in (or, first, begin) an identifier;
// colons are for recording rules' names.
func isIdent(c byte, first bool) bool {
	switch {
	case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c == '_', c == ':':
		return true
	case c >= '0' && c <= '9':
		return !first
	}
	return false
}

func skipSpace(s string, i int) int {
	for i < len(s) && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r') {
		i++
	}
	return i
}

// skipString returns the index after the string literal opening at i.
func skipString(s string, i int) (int, error) {
	q := s[i]
	for j := i + 1; j < len(s); j++ {
		switch {
		case s[j] == '\\' && q != '`':
			j++
		case s[j] == q:
			return j + 1, nil
		}
	}
	return 0, fmt.Errorf("promql: unclosed string at %d in %q", i, s)
}

// skipBalanced returns the index after the bracket closing the one at i,
// strings inside included.
func skipBalanced(s string, i int, open, close byte) (int, error) {
	depth := 0
	for j := i; j < len(s); j++ {
		switch s[j] {
		case '"', '\'', '`':
			end, err := skipString(s, j)
			if err != nil {
				return 0, err
			}
			j = end - 1
		case open:
			depth++
		case close:
			depth--
			if depth == 0 {
				return j + 1, nil
			}
		}
	}
	return 0, fmt.Errorf("promql: unclosed %c at %d in %q", open, i, s)
}
