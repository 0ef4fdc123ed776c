// Package dashboard reads the Grafana dashboard the Helm chart ships
// (deploy/helm/registry-proxy/dashboards): the metric names its PromQL
// uses, for the test that holds it to what nodes export, and a preview of
// it drawn from a Prometheus server's answers, for the documentation.
package dashboard

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
)

// Dashboard is the part of Grafana's dashboard model this package reads.
type Dashboard struct {
	UID           string     `json:"uid"`
	Title         string     `json:"title"`
	SchemaVersion int        `json:"schemaVersion"`
	Panels        []Panel    `json:"panels"`
	Templating    Templating `json:"templating"`
}

// Templating holds the dashboard's variables.
type Templating struct {
	List []Variable `json:"list"`
}

// Variable is a template variable. Query is a string for a datasource
// variable (its plugin type) and, for a query variable, either a string or
// Grafana's {"query": ...} object.
type Variable struct {
	Name       string          `json:"name"`
	Type       string          `json:"type"`
	Query      json.RawMessage `json:"query"`
	Datasource *Datasource     `json:"datasource"`
	AllValue   string          `json:"allValue"`
}

// QueryText is the variable's query as text.
func (v Variable) QueryText() string {
	var s string
	if json.Unmarshal(v.Query, &s) == nil {
		return s
	}
	var o struct {
		Query string `json:"query"`
	}
	json.Unmarshal(v.Query, &o)
	return o.Query
}

// Datasource refers to a data source, by uid: "${datasource}" names the
// dashboard's variable.
type Datasource struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

// Panel is one panel; a row's Panels are those it holds while collapsed.
type Panel struct {
	ID          int         `json:"id"`
	Type        string      `json:"type"`
	Title       string      `json:"title"`
	Description string      `json:"description"`
	GridPos     GridPos     `json:"gridPos"`
	Datasource  *Datasource `json:"datasource"`
	Targets     []Target    `json:"targets"`
	FieldConfig FieldConfig `json:"fieldConfig"`
	Panels      []Panel     `json:"panels"`
}

// GridPos places a panel on Grafana's grid: 24 columns, rows of 30 px.
type GridPos struct {
	H int `json:"h"`
	W int `json:"w"`
	X int `json:"x"`
	Y int `json:"y"`
}

// Target is one query of a panel.
type Target struct {
	RefID        string      `json:"refId"`
	Expr         string      `json:"expr"`
	LegendFormat string      `json:"legendFormat"`
	Instant      bool        `json:"instant"`
	Datasource   *Datasource `json:"datasource"`
}

// FieldConfig holds the display defaults the preview uses.
type FieldConfig struct {
	Defaults struct {
		Unit       string   `json:"unit"`
		Decimals   *int     `json:"decimals"`
		Min        *float64 `json:"min"`
		Max        *float64 `json:"max"`
		Thresholds struct {
			Steps []struct {
				Color string   `json:"color"`
				Value *float64 `json:"value"` // nil: the base, from -Inf
			} `json:"steps"`
		} `json:"thresholds"`
	} `json:"defaults"`
}

// Load reads a dashboard file.
func Load(path string) (*Dashboard, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("dashboard: %w", err)
	}
	return Parse(b)
}

// Parse reads a dashboard's JSON.
func Parse(b []byte) (*Dashboard, error) {
	var d Dashboard
	if err := json.Unmarshal(b, &d); err != nil {
		return nil, fmt.Errorf("dashboard: %w", err)
	}
	return &d, nil
}

// AllPanels lists every panel, those inside collapsed rows included, in
// the file's order.
func (d *Dashboard) AllPanels() []Panel {
	var out []Panel
	for _, p := range d.Panels {
		out = append(out, p)
		out = append(out, p.Panels...)
	}
	return out
}

// Query is one PromQL expression of the dashboard and where it is.
type Query struct {
	Where string // "panel 3 (Title) A" or "variable instance"
	Expr  string
}

// Queries lists every PromQL expression: each panel target's, and each
// query variable's (the selector of label_values(SELECTOR, LABEL), or the
// query itself).
func (d *Dashboard) Queries() []Query {
	var out []Query
	for _, p := range d.AllPanels() {
		for _, t := range p.Targets {
			out = append(out, Query{Where: fmt.Sprintf("panel %d (%s) %s", p.ID, p.Title, t.RefID), Expr: t.Expr})
		}
	}
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue
		}
		out = append(out, Query{Where: "variable " + v.Name, Expr: variableExpr(v.QueryText())})
	}
	return out
}

// variableExpr is the PromQL inside one of Grafana's Prometheus variable
// functions: label_values(SELECTOR, LABEL) and query_result(QUERY); a
// metric-less label_values(LABEL) has none.
func variableExpr(q string) string {
	q = strings.TrimSpace(q)
	for _, fn := range []string{"label_values(", "query_result("} {
		if !strings.HasPrefix(q, fn) || !strings.HasSuffix(q, ")") {
			continue
		}
		inner := q[len(fn) : len(q)-1]
		if fn == "query_result(" {
			return inner
		}
		if i := strings.LastIndex(inner, ","); i >= 0 {
			return inner[:i]
		}
		return ""
	}
	return q
}
