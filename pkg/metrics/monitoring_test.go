package metrics

// Checks of the shipped monitoring artefacts against the metrics this
// package registers: the alert rules (plain and PrometheusRule), the Grafana
// dashboard and the metric reference in the documentation.

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"gopkg.in/yaml.v3"
)

const monitoringDir = "../../manifests/monitoring"

// labelNames are the labels a query may group or match by: those this
// package exports plus the target labels Prometheus adds.
var labelNames = map[string]bool{
	"upstream": true, "source": true, "reason": true, "le": true,
	"version": true, "commit": true, "goversion": true,
	"instance": true, "job": true,
}

// exportedNames returns every series name a query may use: each
// extractedprism family, histograms with their _bucket, _sum and _count.
func exportedNames(t *testing.T) map[string]bool {
	t.Helper()
	m, reg := newTest(t)
	exercise(m)
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, mf := range mfs {
		n := mf.GetName()
		if !strings.HasPrefix(n, Namespace+"_") {
			continue
		}
		if mf.GetType() == dto.MetricType_HISTOGRAM {
			for _, s := range []string{"_bucket", "_sum", "_count"} {
				names[n+s] = true
			}
			continue
		}
		names[n] = true
	}
	return names
}

var (
	stringLit   = regexp.MustCompile("\"(?:[^\"\\\\]|\\\\.)*\"|'(?:[^'\\\\]|\\\\.)*'|`[^`]*`")
	rangeSel    = regexp.MustCompile(`\[[^\]]*\]`)
	matchers    = regexp.MustCompile(`\{([^}]*)\}`)
	matcherName = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)`)
	grouping    = regexp.MustCompile(`\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)`)
	token       = regexp.MustCompile(`[0-9][0-9.]*(?:[eE][+-]?[0-9]+)?[a-zA-Z]*|[a-zA-Z_:][a-zA-Z0-9_:]*(\s*\()?`)
	keywords    = map[string]bool{
		"by": true, "without": true, "on": true, "ignoring": true, "group_left": true,
		"group_right": true, "and": true, "or": true, "unless": true, "bool": true,
		"offset": true, "inf": true, "nan": true,
	}
)

// queryNames returns the metric names and label names a PromQL expression
// uses. It is a tokenizer, not a parser: good enough for our own queries.
func queryNames(expr string) (metrics, labels []string) {
	s := stringLit.ReplaceAllString(expr, `""`)
	s = rangeSel.ReplaceAllString(s, "")
	for _, m := range matchers.FindAllStringSubmatch(s, -1) {
		for _, n := range matcherName.FindAllStringSubmatch(m[1], -1) {
			labels = append(labels, n[1])
		}
	}
	s = matchers.ReplaceAllString(s, "")
	for _, g := range grouping.FindAllStringSubmatch(s, -1) {
		for _, l := range strings.Split(g[2], ",") {
			if l = strings.TrimSpace(l); l != "" {
				labels = append(labels, l)
			}
		}
	}
	s = grouping.ReplaceAllString(s, "")
	for _, m := range token.FindAllStringSubmatch(s, -1) {
		tok := m[0]
		if tok[0] >= '0' && tok[0] <= '9' || m[1] != "" || keywords[strings.ToLower(tok)] {
			continue // number, function call or keyword
		}
		metrics = append(metrics, tok)
	}
	return metrics, labels
}

func TestQueryNames(t *testing.T) {
	ms, ls := queryNames(`sum by (instance, le) (rate(extractedprism_x_bucket{instance=~"$instance", a!="b{"}[$__rate_interval])) > 0.05
		or count(up offset 5m) unless on (job) vector(0) < scalar(max(extractedprism_y)) * 1e-3`)
	if want := []string{"extractedprism_x_bucket", "up", "extractedprism_y"}; !reflect.DeepEqual(ms, want) {
		t.Errorf("metrics = %q, want %q", ms, want)
	}
	if want := []string{"instance", "a", "instance", "le", "job"}; !reflect.DeepEqual(ls, want) {
		t.Errorf("labels = %q, want %q", ls, want)
	}
}

// checkQuery reports a query that uses a series or label we do not export.
func checkQuery(t *testing.T, where, expr string, exported map[string]bool) {
	t.Helper()
	ms, ls := queryNames(expr)
	if len(ms) == 0 {
		t.Errorf("%s: query uses no metric: %s", where, expr)
	}
	for _, m := range ms {
		if !exported[m] {
			t.Errorf("%s: query uses %q, which pkg/metrics does not export: %s", where, m, expr)
		}
	}
	for _, l := range ls {
		if !labelNames[l] {
			t.Errorf("%s: query uses label %q, which no series has: %s", where, l, expr)
		}
	}
}

type ruleGroup struct {
	Name  string `yaml:"name"`
	Rules []rule `yaml:"rules"`
}

type rule struct {
	Alert       string            `yaml:"alert"`
	Record      string            `yaml:"record"`
	Expr        string            `yaml:"expr"`
	For         string            `yaml:"for"`
	Labels      map[string]string `yaml:"labels"`
	Annotations map[string]string `yaml:"annotations"`
}

func readYAML(t *testing.T, path string, v any) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	dec := yaml.NewDecoder(strings.NewReader(string(b)))
	dec.KnownFields(true)
	if err := dec.Decode(v); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
}

// alertNames are the alerts the rules file must define.
var alertNames = []string{
	"ExtractedprismClientsRefused",
	"ExtractedprismConfigReloadFailed",
	"ExtractedprismFrequentFailovers",
	"ExtractedprismHealthyUpstreamsBelowCluster",
	"ExtractedprismNoHealthyUpstream",
	"ExtractedprismUpstreamDownOnMostNodes",
	"ExtractedprismUpstreamsBelowCluster",
}

func TestAlertRules(t *testing.T) {
	exported := exportedNames(t)
	var plain struct {
		Groups []ruleGroup `yaml:"groups"`
	}
	readYAML(t, filepath.Join(monitoringDir, "prometheus-rules.yaml"), &plain)
	var cr struct {
		APIVersion string `yaml:"apiVersion"`
		Kind       string `yaml:"kind"`
		Metadata   struct {
			Name   string            `yaml:"name"`
			Labels map[string]string `yaml:"labels"`
		} `yaml:"metadata"`
		Spec struct {
			Groups []ruleGroup `yaml:"groups"`
		} `yaml:"spec"`
	}
	readYAML(t, filepath.Join(monitoringDir, "prometheusrule.yaml"), &cr)
	if cr.APIVersion != "monitoring.coreos.com/v1" || cr.Kind != "PrometheusRule" || cr.Metadata.Name == "" {
		t.Errorf("prometheusrule.yaml: apiVersion %q kind %q name %q, want monitoring.coreos.com/v1 PrometheusRule with a name",
			cr.APIVersion, cr.Kind, cr.Metadata.Name)
	}
	if !reflect.DeepEqual(plain.Groups, cr.Spec.Groups) {
		t.Error("prometheusrule.yaml and prometheus-rules.yaml define different rules")
	}

	var got []string
	for _, g := range plain.Groups {
		if g.Name == "" || len(g.Rules) == 0 {
			t.Errorf("group %q: needs a name and rules", g.Name)
		}
		for _, r := range g.Rules {
			where := "alert " + r.Alert
			if r.Alert == "" {
				t.Errorf("group %s: rule without alert name: %s", g.Name, r.Expr)
				continue
			}
			got = append(got, r.Alert)
			checkQuery(t, where, r.Expr, exported)
			if d, err := time.ParseDuration(r.For); err != nil || d <= 0 {
				t.Errorf("%s: for %q is not a positive duration", where, r.For)
			}
			if s := r.Labels["severity"]; s != "critical" && s != "warning" && s != "info" {
				t.Errorf("%s: severity %q, want critical, warning or info", where, s)
			}
			if r.Annotations["summary"] == "" || r.Annotations["description"] == "" {
				t.Errorf("%s: needs summary and description annotations", where)
			}
		}
	}
	sort.Strings(got)
	if !reflect.DeepEqual(got, alertNames) {
		t.Errorf("alerts = %q, want %q", got, alertNames)
	}
}

// TestPromtool runs Prometheus' own checker and the alert unit tests when
// promtool is installed (CI installs it).
func TestPromtool(t *testing.T) {
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Skip("promtool not installed (apt-get install prometheus)")
	}
	run := func(args ...string) {
		t.Helper()
		cmd := exec.Command(promtool, args...)
		cmd.Dir = monitoringDir
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	run("check", "rules", "prometheus-rules.yaml")
	run("test", "rules", "rules-test.yaml")

	// The dashboard queries, as recording rules, through the same checker.
	exprs := dashboardQueries(t)
	var rules []map[string]string
	for i, e := range exprs {
		e = strings.NewReplacer("$__rate_interval", "5m", "$instance", ".*").Replace(e)
		rules = append(rules, map[string]string{"record": "dashboard:query" + string(rune('a'+i/26)) + string(rune('a'+i%26)), "expr": e})
	}
	b, err := yaml.Marshal(map[string]any{"groups": []map[string]any{{"name": "dashboard", "rules": rules}}})
	if err != nil {
		t.Fatal(err)
	}
	f := filepath.Join(t.TempDir(), "dashboard-rules.yaml")
	if err := os.WriteFile(f, b, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err = filepath.Abs(f)
	if err != nil {
		t.Fatal(err)
	}
	run("check", "rules", f)
}

// dashboardQueries returns every target expression of the dashboard.
func dashboardQueries(t *testing.T) []string {
	t.Helper()
	d := readDashboard(t)
	var exprs []string
	for _, p := range allPanels(d.Panels) {
		for _, tg := range p.Targets {
			exprs = append(exprs, tg.Expr)
		}
	}
	return exprs
}

type dashboard struct {
	Title      string  `json:"title"`
	UID        string  `json:"uid"`
	Panels     []panel `json:"panels"`
	Templating struct {
		List []struct {
			Name string `json:"name"`
			Type string `json:"type"`
		} `json:"list"`
	} `json:"templating"`
}

type panel struct {
	ID         int             `json:"id"`
	Type       string          `json:"type"`
	Title      string          `json:"title"`
	Datasource json.RawMessage `json:"datasource"`
	GridPos    struct{ H, W, X, Y int }
	Targets    []struct {
		Expr       string          `json:"expr"`
		Datasource json.RawMessage `json:"datasource"`
	} `json:"targets"`
	Panels []panel `json:"panels"`
}

func readDashboard(t *testing.T) dashboard {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(monitoringDir, "grafana-dashboard.json"))
	if err != nil {
		t.Fatal(err)
	}
	var d dashboard
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("grafana-dashboard.json: %v", err)
	}
	return d
}

func allPanels(ps []panel) []panel {
	var out []panel
	for _, p := range ps {
		out = append(out, p)
		out = append(out, allPanels(p.Panels)...)
	}
	return out
}

func TestDashboard(t *testing.T) {
	exported := exportedNames(t)
	d := readDashboard(t)
	if d.Title == "" || d.UID == "" {
		t.Errorf("dashboard needs a title and a uid")
	}
	vars := map[string]string{}
	for _, v := range d.Templating.List {
		vars[v.Name] = v.Type
	}
	if vars["datasource"] != "datasource" || vars["instance"] != "query" {
		t.Errorf("template variables %v, want datasource (datasource) and instance (query)", vars)
	}
	ids := map[int]string{}
	used := map[string]bool{}
	for _, p := range allPanels(d.Panels) {
		if prev, ok := ids[p.ID]; ok {
			t.Errorf("panel id %d used by %q and %q", p.ID, prev, p.Title)
		}
		ids[p.ID] = p.Title
		if p.Type == "row" {
			continue
		}
		if p.GridPos.W == 0 || p.GridPos.H == 0 || p.GridPos.X+p.GridPos.W > 24 {
			t.Errorf("panel %q: bad gridPos %+v", p.Title, p.GridPos)
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, tg := range p.Targets {
			where := "panel " + p.Title
			checkQuery(t, where, tg.Expr, exported)
			if !strings.Contains(tg.Expr, `instance=~"$instance"`) {
				t.Errorf("%s: query ignores the node selector: %s", where, tg.Expr)
			}
			if !strings.Contains(string(tg.Datasource), "${datasource}") {
				t.Errorf("%s: target does not use the datasource variable", where)
			}
			ms, _ := queryNames(tg.Expr)
			for _, m := range ms {
				used[strings.TrimSuffix(m, "_bucket")] = true
			}
		}
	}
	// Every extractedprism family appears on the dashboard.
	for n := range exported {
		base := strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(n, "_bucket"), "_sum"), "_count")
		if !used[base] && !used[n] {
			t.Errorf("no dashboard panel shows %s", base)
		}
	}
	for _, want := range []string{
		"Upstream health per node", "Active connections per upstream", "Failovers per node",
		"Dial failures by reason", "Probe latency per upstream", "Config reload status",
	} {
		found := false
		for _, p := range ids {
			found = found || p == want
		}
		if !found {
			t.Errorf("dashboard lacks the panel %q", want)
		}
	}
}

// TestDocumentation checks that docs/observability.md describes every
// metric and every alert.
func TestDocumentation(t *testing.T) {
	b, err := os.ReadFile("../../docs/observability.md")
	if err != nil {
		t.Fatal(err)
	}
	doc := string(b)
	_, reg := newTest(t)
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		n := mf.GetName()
		if strings.HasPrefix(n, Namespace+"_") && !strings.Contains(doc, "`"+n+"`") {
			t.Errorf("docs/observability.md does not document `%s`", n)
		}
	}
	for _, n := range []string{"extractedprism_build_info", "extractedprism_upstream_healthy"} {
		if !strings.Contains(doc, "`"+n+"`") {
			t.Errorf("docs/observability.md does not document `%s`", n)
		}
	}
	for _, a := range alertNames {
		if !strings.Contains(doc, a) {
			t.Errorf("docs/observability.md does not describe the alert %s", a)
		}
	}
}
